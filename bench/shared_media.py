"""Benchmark 11, shared media: one reference image shared by every row, inline vs the Files API.

    python bench/shared_media.py --url URL --image PNG --rows N --upload never|auto --cache DIR

1,000 rows, each its own prompt with the same ~5 MB PNG (noise: it does not compress),
concurrency 16, against the offline emulator served over TCP in its own process (``gemframe
emulator``, no latency: it counts every request body byte it receives, ``/emulator/stats``).
``upload="never"``: every request carries the image inline (base64); ``upload="auto"`` (the
default): the image is uploaded once through the Files API's resumable upload and every request
names it by ``fileData``. Figures: bytes received at the server (goal: the auto job under 1.5x
the image plus 2 kB per row), uploads, generateContent requests and wall time of each job; then
a rerun of the auto job with new prompts and the same cache directory, which should upload
nothing (the file is reused by digest).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

from _common import PYTHON, BenchServer, Row, Section, emit, timed

SIZES = {"quick": dict(rows=8, image=300_000), "default": dict(rows=1000, image=5_000_000)}
CONCURRENCY = 16


class EmulatorServer(BenchServer):
    """`gemframe emulator` in its own process (its stats at ``/emulator/stats``)."""

    def command(self) -> list[str]:
        return [PYTHON, "-m", "gemframe", "emulator", "--port", str(self.port), "--no-markers"]

    def stats(self) -> dict[str, Any]:
        return self._call("/emulator/stats")

    def reset(self) -> None:
        self._call("/emulator/reset", "POST")


def worker(url: str, image: str, rows: int, upload: str, cache: str, tag: str) -> dict[str, Any]:
    import polars as pl

    import gemframe as gf

    texts = [f"describe the reference, {tag} row {i}" for i in range(rows)]
    client = gf.Client(
        "emulator",
        base_url=url,
        model="gemini-2.5-flash",
        concurrency=CONCURRENCY,
        cache_dir=cache,
        progress=False,
        upload=upload,
    )
    frame = pl.DataFrame({"prompt": texts, "image": [image] * rows})
    with timed() as t:
        out = frame.with_columns(reply=gf.generate("prompt", images="image", client=client))
    client.close()
    replies = out["reply"].struct
    t.update(
        errors=int(replies.field("error").is_not_null().sum()),
        wrong=int((~replies.field("text").str.contains("Image 1: PNG", literal=True)).sum()),
    )
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--upload", choices=["never", "auto"], required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--tag", default="first")
    args = parser.parse_args()
    emit({**worker(args.url, args.image, args.rows, args.upload, args.cache, args.tag), "rows": args.rows})


def run(mode: str) -> Section:
    from _common import run_worker
    from images import noise_png

    size = SIZES.get(mode, SIZES["default"])
    rows = size["rows"]
    section = Section(
        "shared_media",
        "11. Shared media (Files API)",
        f"{rows:,} rows sharing one ~{size['image'] / 1e6:.1f} MB PNG (noise), concurrency {CONCURRENCY}, against "
        "`gemframe emulator` over TCP in its own process (no latency), which counts the request body bytes it "
        "receives on every route. Baseline: the same job with `upload='never'` (the image inline in every "
        "request); then `upload='auto'` (the default: uploaded once, named by `fileData`); then a rerun of the "
        "auto job with new prompts and the same cache directory.",
    )
    with tempfile.TemporaryDirectory(prefix="gf-bench-media-") as tmp, EmulatorServer() as server:
        image = os.path.join(tmp, "reference.png")
        with open(image, "wb") as f:
            f.write(noise_png(size["image"], 11))
        image_bytes = os.path.getsize(image)
        found: dict[str, dict[str, Any]] = {}
        for name, upload, tag in (("inline", "never", "first"), ("auto", "auto", "first"), ("rerun", "auto", "rerun")):
            server.reset()
            cache = os.path.join(tmp, f"cache-{upload}")
            args = ["--url", server.url, "--image", image, "--rows", str(rows), "--upload", upload]
            found[name] = run_worker("shared_media.py", [*args, "--cache", cache, "--tag", tag], timeout=3600)
            found[name].update(server.stats())
    inline, auto, rerun = found["inline"], found["auto"], found["rerun"]
    for name, r in found.items():
        if r["errors"] or r["wrong"]:
            section.notes.append(f"{name}: {r['errors']} errors, {r['wrong']} wrong answers of {rows} rows")
    section.rows.append(
        Row(
            f"{rows:,} rows, one shared image: bytes received at the server",
            round(auto["bytes_received"] / 1e6, 2),
            round(inline["bytes_received"] / 1e6, 2),
            "inline (upload='never')",
            "MB",
            goal=f"<= 1.5x the image + 2 kB/row ({(1.5 * image_bytes + 2000 * rows) / 1e6:.1f} MB)",
            met=auto["bytes_received"] <= 1.5 * image_bytes + 2000 * rows,
            note=f"image {image_bytes / 1e6:.2f} MB; auto: {auto['uploads']} upload(s), {auto['requests']:,} "
            f"generateContent requests; inline: {inline['uploads']} uploads, {inline['requests']:,} requests",
        )
    )
    section.rows.append(
        Row(
            f"{rows:,} rows, one shared image: wall time",
            round(auto["wall_s"], 2),
            round(inline["wall_s"], 2),
            "inline (upload='never')",
            "s",
            note=f"client CPU: auto {auto['cpu_s']:.1f} s, inline {inline['cpu_s']:.1f} s; peak RSS: auto "
            f"{auto['peak_rss_mb']:.0f} MiB, inline {inline['peak_rss_mb']:.0f} MiB",
        )
    )
    section.rows.append(
        Row(
            "rerun with new prompts, same cache directory: uploads",
            rerun["uploads"],
            0,
            "none",
            "",
            goal="0",
            met=rerun["uploads"] == 0,
            note=f"{rerun['requests']:,} requests, {rerun['bytes_received'] / 1e3:.0f} kB received, "
            f"{rerun['wall_s']:.2f} s",
        )
    )
    return section


if __name__ == "__main__":
    main()
