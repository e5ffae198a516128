"""Benchmark 6, images: one shared 2 MB image on many rows, and many distinct 200 KB images.

    python bench/images.py --client gemframe|aiohttp --url URL --images shared.png|DIR --rows N

Images are random-noise PNGs (incompressible, so the sizes are real); the distinct files are one
noise picture each with its own ``tEXt`` chunk (different bytes and digests, cheap to make). Every row has its own
prompt (identical rows would be deduplicated into one request) and its image; the server
receives the full base64 body each time. Both clients use concurrency 16 (gemframe's default)
and send the same JSON (``contents[0].parts = [text, inlineData]``).

- ``shared``: 1,000 rows all naming the same 2 MB file. gemframe should read and base64-encode
  it once. Counted in the worker: `open()` calls on image files, ``base64.b64encode`` calls on
  more than 100 kB (both wrapped), and ``gemframe._core.payload._inline_file.cache_info()`` if present.
  Baseline: raw aiohttp that reads+encodes the file once and posts it N times.
- ``distinct``: 200 rows, 200 different ~200 KB files. Baseline: raw aiohttp that reads,
  base64-encodes and posts each file. Figure: wall time per row.
- ``large``: 200 rows, 200 different 2 MB files: peak RSS against the same baseline (which holds
  at most its 16 in-flight bodies and a 32-file encode cache).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import builtins
import functools
import io
import json
import os
import struct
import tempfile
import zlib
from typing import Any

from _common import API_KEY, MODEL, BenchServer, Row, Section, emit, run_worker, timed

SIZES = {
    "quick": dict(shared_rows=4, distinct_rows=4, large_rows=2),  # every case, at the smallest size
    "default": dict(shared_rows=1000, distinct_rows=200, large_rows=200),
}
CONCURRENCY = 16
SHARED_BYTES = 2_000_000
DISTINCT_BYTES = 200_000


def noise_png(nbytes: int, seed: int) -> bytes:
    """A random-noise RGB PNG of about ``nbytes`` bytes."""
    import numpy as np
    from PIL import Image

    side = int((nbytes / 3) ** 0.5)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "PNG", compress_level=1)
    return out.getvalue()


def variant(png: bytes, tag: str) -> bytes:
    """The same picture with a ``tEXt`` chunk after IHDR: a valid PNG with different bytes
    (so a different digest), made without encoding the pixels again."""
    text = b"Comment\x00" + tag.encode()
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    end_of_ihdr = 8 + 8 + 13 + 4
    return png[:end_of_ihdr] + chunk + png[end_of_ihdr:]


def write_images(directory: str, png: bytes, count: int) -> None:
    os.makedirs(directory)
    for i in range(count):
        with open(os.path.join(directory, f"{i:04d}.png"), "wb") as f:
            f.write(variant(png, f"image {i}"))


class Counters:
    """Counts file opens under a directory and large base64 encodes, process-wide."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.opens = 0
        self.encodes = 0
        real_open, real_b64 = builtins.open, base64.b64encode

        def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(file, (str, os.PathLike)) and os.path.abspath(os.fspath(file)).startswith(self.directory):
                self.opens += 1
            return real_open(file, *args, **kwargs)

        def counting_b64(data: Any, *args: Any, **kwargs: Any) -> bytes:
            if len(data) > 100_000:
                self.encodes += 1
            return real_b64(data, *args, **kwargs)

        builtins.open = io.open = counting_open  # type: ignore[assignment]
        base64.b64encode = counting_b64  # type: ignore[assignment]


def _paths(images: str, rows: int) -> list[str]:
    if os.path.isdir(images):
        files = sorted(os.path.join(images, f) for f in os.listdir(images))
        return [files[i % len(files)] for i in range(rows)]
    return [images] * rows


def _gemframe(url: str, texts: list[str], paths: list[str], counters: Counters) -> dict[str, Any]:
    import polars as pl

    import gemframe as gf
    import gemframe._core.payload as payload

    client = gf.Client(
        "google",
        api_key=API_KEY,
        base_url=url,
        model=MODEL,
        concurrency=CONCURRENCY,
        cache="off",
        progress=False,
        upload="never",  # inline, as the baseline sends it (bench 11 measures the Files API)
    )
    frame = pl.DataFrame({"prompt": texts, "image": paths})
    with timed() as t:
        out = frame.with_columns(reply=gf.generate("prompt", images="image", client=client))
    client.close()
    replies = out["reply"].struct
    info = getattr(getattr(payload, "_inline_file", None), "cache_info", None)
    t.update(
        wrong=int((replies.field("text") != ("echo: " + out["prompt"])).sum()),
        errors=int(replies.field("error").is_not_null().sum()),
        lru_misses=info().misses if info else None,
    )
    return t


async def _aiohttp(url: str, texts: list[str], paths: list[str]) -> dict[str, Any]:
    import aiohttp

    target = f"{url}/v1beta/models/{MODEL}:generateContent"
    headers = {"content-type": "application/json", "x-goog-api-key": API_KEY}

    @functools.lru_cache(maxsize=32)  # what a careful hand-written loop does: encode a repeated file once
    def inline(path: str) -> str:
        with open(path, "rb") as f:
            return base64.b64encode(f.read()).decode("ascii")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY), headers=headers) as session:
        slots = asyncio.Semaphore(CONCURRENCY)

        async def one(text: str, path: str) -> str:
            async with slots:
                body = {
                    "contents": [
                        {
                            "role": "user",
                            "parts": [
                                {"text": text},
                                {"inlineData": {"mimeType": "image/png", "data": inline(path)}},
                            ],
                        }
                    ]
                }
                content = json.dumps(body, separators=(",", ":")).encode()
                async with session.post(target, data=content) as response:
                    answer = json.loads(await response.read())
            return answer["candidates"][0]["content"]["parts"][0]["text"]

        with timed() as t:
            answers = await asyncio.gather(*(one(x, p) for x, p in zip(texts, paths)))
    t["wrong"] = sum(a != f"echo: {x}" for a, x in zip(answers, texts))
    t["errors"] = 0
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client", choices=["gemframe", "aiohttp"], required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--images", required=True, help="one image file (shared) or a directory (distinct)")
    parser.add_argument("--rows", type=int, required=True)
    args = parser.parse_args()
    texts = [f"describe image row {i}" for i in range(args.rows)]
    paths = _paths(args.images, args.rows)
    counters = Counters(os.path.dirname(args.images) if os.path.isfile(args.images) else args.images)
    if args.client == "gemframe":
        result = _gemframe(args.url, texts, paths, counters)
    else:
        result = asyncio.run(_aiohttp(args.url, texts, paths))
    emit({**result, "opens": counters.opens, "encodes": counters.encodes, "rows": args.rows})


def run(mode: str) -> Section:
    size = SIZES.get(mode, SIZES["default"])
    section = Section(
        "images",
        "6. Images",
        f"concurrency {CONCURRENCY}, cache off, server latency 0; random-noise PNGs; every row its own prompt. "
        "Baseline: raw aiohttp that reads + base64-encodes each distinct file once and posts the same JSON.",
    )
    with tempfile.TemporaryDirectory(prefix="gf-bench-images-") as tmp, BenchServer(0.0) as server:
        shared = os.path.join(tmp, "shared", "shared.png")
        distinct, large = os.path.join(tmp, "distinct"), os.path.join(tmp, "large")
        big_png = noise_png(SHARED_BYTES, 0)
        os.makedirs(os.path.dirname(shared))
        with open(shared, "wb") as f:
            f.write(big_png)
        write_images(distinct, noise_png(DISTINCT_BYTES, 1), size["distinct_rows"])
        write_images(large, big_png, size["large_rows"])
        shared_mb = os.path.getsize(shared) / 1e6
        distinct_kb = (
            sum(os.path.getsize(os.path.join(distinct, f)) for f in os.listdir(distinct)) / size["distinct_rows"] / 1e3
        )
        cases = [("shared", shared, size["shared_rows"]), ("distinct", distinct, size["distinct_rows"])]
        if size["large_rows"]:
            cases.append(("large", large, size["large_rows"]))
        for case, images, rows in cases:
            found = {}
            for client in ("aiohttp", "gemframe"):
                server.reset()
                r = run_worker(
                    "images.py", ["--client", client, "--url", server.url, "--images", images, "--rows", str(rows)]
                )
                stats = server.stats()
                r["requests"], r["mb_in"] = stats["requests"], stats["bytes_in"] / 1e6
                if r["wrong"] or r["errors"] or r["requests"] != rows:
                    section.notes.append(
                        f"{case}/{client}: {r['wrong']} wrong, {r['errors']} errors, {r['requests']} requests for {rows} rows"
                    )
                found[client] = r
            gf, base = found["gemframe"], found["aiohttp"]
            if case == "large":
                section.rows.append(
                    Row(
                        f"{rows:,} rows, distinct {shared_mb:.1f} MB images: peak RSS",
                        gf["peak_rss_mb"],
                        base["peak_rss_mb"],
                        "raw aiohttp",
                        "MiB",
                        goal="(bench) <= 2x baseline",
                        met=gf["peak_rss_mb"] <= 2 * base["peak_rss_mb"],
                        note=f"time per row {1000 * gf['wall_s'] / rows:.1f} ms vs baseline {1000 * base['wall_s'] / rows:.1f} ms; "
                        f"server received {gf['mb_in']:,.0f} MB",
                    )
                )
                continue
            what = (
                f"{rows:,} rows, one {shared_mb:.1f} MB image"
                if case == "shared"
                else f"{rows:,} rows, distinct ~{distinct_kb:.0f} kB images"
            )
            section.rows.append(
                Row(
                    f"{what}: time per row",
                    round(1000 * gf["wall_s"] / rows, 3),
                    round(1000 * base["wall_s"] / rows, 3),
                    "raw aiohttp",
                    "ms",
                    goal="file read+encoded once" if case == "shared" else "",
                    met=(gf["encodes"] == 1 and gf["opens"] <= 1) if case == "shared" else None,
                    note=(
                        f"gemframe: {gf['opens']} file opens, {gf['encodes']} encodes"
                        + (f", _inline_file misses {gf['lru_misses']}" if gf.get("lru_misses") is not None else "")
                        + f"; peak RSS {gf['peak_rss_mb']:.0f} MiB vs baseline {base['peak_rss_mb']:.0f} MiB; "
                        f"server received {gf['mb_in']:,.0f} MB"
                    ),
                )
            )
    return section


if __name__ == "__main__":
    main()
