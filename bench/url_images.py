"""Benchmark 10, image URLs: distinct images by URL against the same job with local files.

    python bench/url_images.py --source files|urls --url URL --images DIR|IMAGE_URL --rows N --cache DIR

2,000 rows, each its own ~100 kB PNG (the noise picture of bench 6 with its own ``tEXt`` chunk),
concurrency 64, generateContent answered by ``bench/server.py`` after 200 ms. ``files``: the rows
name the files; ``urls``: the rows name ``IMAGE_URL/<n>.png``, served by this script's image
server (``--serve DIR``: aiohttp in its own process on 127.0.0.1, keep-alive, each image after
100 ms). Both jobs use a fresh cache directory (``cache="use"``: the URL store is where fetched
images go). Figures: the URL job's wall time and peak RSS over the files job's (goal <= 1.3x
each), downloads the image server saw (one per URL) and the most it served at once; then a
rerun of the URL job, which should download nothing and send nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from typing import Any

from _common import API_KEY, BENCH, MODEL, PYTHON, BenchServer, Row, Section, emit, free_port, popen, run_worker, timed

SIZES = {
    "quick": dict(rows=32, generate_latency=0.05, download_latency=0.02),  # a second at most
    "default": dict(rows=2000, generate_latency=0.2, download_latency=0.1),
}
CONCURRENCY = 64
IMAGE_BYTES = 100_000
DOWNLOAD_LATENCY = 0.1  # the image server's default


# --------------------------------------------------------------------------- the image server


def serve(directory: str, port: int, latency: float) -> None:
    """Serve ``directory``'s files at ``/<name>`` after ``latency`` seconds each; ``/stats``
    gives ``{"requests", "max_inflight"}``."""
    from aiohttp import web

    stats = {"requests": 0, "inflight": 0, "max_inflight": 0}

    async def image(request: web.Request) -> web.Response:
        stats["requests"] += 1
        stats["inflight"] += 1
        stats["max_inflight"] = max(stats["max_inflight"], stats["inflight"])
        try:
            await asyncio.sleep(latency)
            with open(os.path.join(directory, os.path.basename(request.match_info["name"])), "rb") as f:
                return web.Response(body=f.read(), content_type="image/png")
        finally:
            stats["inflight"] -= 1

    async def report(_: web.Request) -> web.Response:
        return web.json_response(stats)

    app = web.Application()
    app.router.add_get("/stats", report)
    app.router.add_get("/img/{name}", image)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


class ImageServer:
    def __init__(self, directory: str, latency: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = popen(
            [
                PYTHON,
                str(BENCH / "url_images.py"),
                "--serve",
                directory,
                "--port",
                str(self.port),
                "--latency",
                str(latency),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                self.stats()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("image server did not start") from None
                time.sleep(0.05)

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/stats", timeout=10) as answer:
            return json.loads(answer.read())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


# --------------------------------------------------------------------------- the worker


def worker(source: str, url: str, images: str, rows: int, cache: str) -> dict[str, Any]:
    import polars as pl

    import gemframe as gf

    names = [f"{i:04d}.png" for i in range(rows)]  # as images.write_images names them
    where = [f"{images}/{n}" if source == "urls" else os.path.join(images, n) for n in names]
    texts = [f"describe image row {i}" for i in range(rows)]
    client = gf.Client(
        "google",
        api_key=API_KEY,
        base_url=url,
        model=MODEL,
        concurrency=CONCURRENCY,
        cache_dir=cache,
        progress=False,
        allow_private_urls=True,  # the image server is on loopback
    )
    frame = pl.DataFrame({"prompt": texts, "image": where})
    with timed() as t:
        out = frame.with_columns(reply=gf.generate("prompt", images="image", client=client))
    client.close()
    replies = out["reply"].struct
    t.update(
        errors=int(replies.field("error").is_not_null().sum()),
        wrong=int((replies.field("text") != ("echo: " + out["prompt"])).sum()),
        cached=int(replies.field("cached").sum()),
    )
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", metavar="DIR", help="run the image server on DIR")
    parser.add_argument("--port", type=int)
    parser.add_argument("--latency", type=float, default=DOWNLOAD_LATENCY)
    parser.add_argument("--source", choices=["files", "urls"])
    parser.add_argument("--url")
    parser.add_argument("--images")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--cache")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.latency)
        return
    emit({**worker(args.source, args.url, args.images, args.rows, args.cache), "rows": args.rows})


def run(mode: str) -> Section:
    from images import noise_png, write_images

    size = SIZES.get(mode, SIZES["default"])
    rows, generate_latency, download_latency = size["rows"], size["generate_latency"], size["download_latency"]
    section = Section(
        "url_images",
        "10. Image URLs",
        f"{rows:,} rows, each its own ~{IMAGE_BYTES // 1000} kB PNG; concurrency {CONCURRENCY}; generateContent "
        f"after {generate_latency * 1000:.0f} ms (bench/server.py); each download after {download_latency * 1000:.0f} ms "
        "(aiohttp image server in its own process); a fresh cache directory per job. Baseline: the same job "
        "with the images as local files.",
    )
    with tempfile.TemporaryDirectory(prefix="gf-bench-urls-") as tmp, BenchServer(generate_latency) as server:
        directory = os.path.join(tmp, "images")
        write_images(directory, noise_png(IMAGE_BYTES, 2), rows)
        images = ImageServer(directory, download_latency)
        try:
            found = {}
            for source, where in (("files", directory), ("urls", images.url + "/img")):
                server.reset()
                found[source] = run_worker(
                    "url_images.py",
                    [
                        "--source",
                        source,
                        "--url",
                        server.url,
                        "--images",
                        where,
                        "--rows",
                        str(rows),
                        "--cache",
                        os.path.join(tmp, f"cache-{source}"),
                    ],
                )
                found[source]["requests"] = server.stats()["requests"]
            downloads = images.stats()
            server.reset()
            rerun = run_worker(
                "url_images.py",
                [
                    "--source",
                    "urls",
                    "--url",
                    server.url,
                    "--images",
                    images.url + "/img",
                    "--rows",
                    str(rows),
                    "--cache",
                    os.path.join(tmp, "cache-urls"),
                ],
            )
            rerun_requests, rerun_downloads = (
                server.stats()["requests"],
                images.stats()["requests"] - downloads["requests"],
            )
        finally:
            images.close()
    files, urls = found["files"], found["urls"]
    for name, r in (*found.items(), ("rerun", rerun)):
        if r["errors"] or r["wrong"]:
            section.notes.append(f"{name}: {r['errors']} errors, {r['wrong']} wrong answers of {rows} rows")
    section.rows.append(
        Row(
            f"{rows:,} distinct image URLs: wall time",
            round(urls["wall_s"], 2),
            round(files["wall_s"], 2),
            "local files",
            "s",
            goal="<= 1.3x",
            met=urls["wall_s"] <= 1.3 * files["wall_s"],
            note=f"{downloads['requests']:,} downloads, at most {downloads['max_inflight']} at once; "
            f"{urls['requests']:,} generateContent requests (files: {files['requests']:,})",
        )
    )
    section.rows.append(
        Row(
            f"{rows:,} distinct image URLs: peak RSS",
            urls["peak_rss_mb"],
            files["peak_rss_mb"],
            "local files",
            "MiB",
            goal="<= 1.3x",
            met=urls["peak_rss_mb"] <= 1.3 * files["peak_rss_mb"],
        )
    )
    section.rows.append(
        Row(
            "rerun of the URL job: downloads + requests",
            rerun_downloads + rerun_requests,
            0,
            "none",
            "",
            goal="0",
            met=rerun_downloads + rerun_requests == 0,
            note=f"{rerun['cached']:,} of {rows:,} rows from the cache in {rerun['wall_s']:.2f} s",
        )
    )
    return section


if __name__ == "__main__":
    main()
