"""One client sending N prompts to the bench server, in a fresh process; prints one JSON line.

    python bench/clients.py --client aiohttp|httpx|gemframe --url URL --rows 5000 --concurrency 64
                            [--cache off|use] [--warmup 200] [--profile OUT.pstats]

The baselines are the loops people write by hand, sending byte-for-byte the bodies gemframe
sends (compact ``{"contents":[{"role":"user","parts":[{"text":...}]}]}``) with the same
headers, and parsing every answer:

- ``aiohttp``: one ``aiohttp.ClientSession`` (connector limit = concurrency) + ``asyncio.Semaphore``;
- ``httpx``: one ``httpx.AsyncClient`` (default transport, pool = concurrency) + semaphore;
- ``gemframe``: ``pl.DataFrame({"prompt": ...}).with_columns(reply=gf.generate("prompt", ...))``,
  i.e. payload building, cache keys, sending, decoding and the Arrow struct.

A warm-up batch (other prompts) runs first on the same session/client, so connection set-up
and imports are outside the measurement for everyone. ``cpu_s`` is ``time.process_time()``
of the whole process (every thread: the caller, gemframe's event-loop thread, polars').
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _common import API_KEY, MODEL, emit, prompts, timed

HEADERS = {"content-type": "application/json", "x-goog-api-key": API_KEY}


def body(prompt: str) -> bytes:
    return json.dumps({"contents": [{"role": "user", "parts": [{"text": prompt}]}]}, separators=(",", ":")).encode()


def endpoint(url: str) -> str:
    return f"{url}/v1beta/models/{MODEL}:generateContent"


def check(answers: list[Any], sent: list[str]) -> int:
    """How many answers are wrong (not the echo of their own prompt)."""
    return sum(a["candidates"][0]["content"]["parts"][0]["text"] != f"echo: {p}" for a, p in zip(answers, sent))


# --------------------------------------------------------------------------- baselines


async def _aiohttp(
    url: str,
    batches: list[list[str]],
    concurrency: int,
    *,
    ssl: Any = None,
    tolerate: bool = False,
    tally: Callable[[dict[str, Any], list[Any], list[str]], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Raw aiohttp + semaphore (also over TLS for bench/http2.py: ``ssl``; ``tolerate`` keeps
    exceptions as answers, ``tally`` summarises each batch instead of counting wrong answers)."""
    import aiohttp

    target = endpoint(url)
    times = []
    connector = aiohttp.TCPConnector(limit=concurrency, **({"ssl": ssl} if ssl is not None else {}))
    async with aiohttp.ClientSession(connector=connector, headers=HEADERS) as session:
        slots = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> Any:
            content = body(prompt)
            async with slots:
                async with session.post(target, data=content) as response:
                    raw = await response.read()
            return json.loads(raw)

        for batch in batches:
            with timed() as t:
                answers = await asyncio.gather(*(one(p) for p in batch), return_exceptions=tolerate)
            if tally is not None:
                times.append(tally(t, answers, batch))
            else:
                t["wrong"] = check(answers, batch)
                times.append(t)
    return times


async def _httpx(url: str, batches: list[list[str]], concurrency: int) -> list[dict[str, float]]:
    import httpx

    target = endpoint(url)
    times = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=HEADERS, limits=limits, timeout=120) as client:
        slots = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> Any:
            content = body(prompt)
            async with slots:
                response = await client.post(target, content=content)
                raw = await response.aread()
            return json.loads(raw)

        for batch in batches:
            with timed() as t:
                answers = await asyncio.gather(*(one(p) for p in batch))
            t["wrong"] = check(answers, batch)
            times.append(t)
    return times


# --------------------------------------------------------------------------- gemframe


def _gemframe(
    url: str, batches: list[list[str]], concurrency: int, cache: str, profile: str | None
) -> list[dict[str, float]]:
    import polars as pl

    import gemframe as gf

    cache_dir = tempfile.mkdtemp(prefix="gf-bench-cache-")
    client = gf.Client(
        "google",
        api_key=API_KEY,
        base_url=url,
        model=MODEL,
        concurrency=concurrency,
        cache=cache,
        cache_dir=cache_dir,
        progress=False,
    )
    expr = gf.generate("prompt", client=client)
    frames = [pl.DataFrame({"prompt": b}) for b in batches]
    times = []
    for i, frame in enumerate(frames):
        profiler = _Profiler() if profile and i == len(frames) - 1 else None
        if profiler:
            profiler.start()
        with timed() as t:
            out = frame.with_columns(reply=expr)
        if profiler:
            profiler.stop(profile)
        replies = out["reply"].struct
        assert replies.field("error").is_null().all(), out.filter(
            pl.col("reply").struct.field("error").is_not_null()
        ).head()
        t["wrong"] = int((replies.field("text") != ("echo: " + out["prompt"])).sum())
        t["cached"] = int(replies.field("cached").sum())
        times.append(t)
    client.close()
    shutil.rmtree(cache_dir, ignore_errors=True)
    return times


class _Profiler:
    """cProfile (CPU time per thread) on the calling thread and gemframe's event-loop thread, merged."""

    def start(self) -> None:
        import cProfile

        from gemframe._core.executor import background_loop

        self.loop = background_loop()
        # thread_time: each profile counts its own thread's CPU, not wall time or the other's CPU.
        self.main = cProfile.Profile(time.thread_time)
        self.background = cProfile.Profile(time.thread_time)
        asyncio.run_coroutine_threadsafe(self._toggle(True), self.loop).result()
        self.main.enable()

    async def _toggle(self, on: bool) -> None:
        (self.background.enable if on else self.background.disable)()

    def stop(self, path: str) -> None:
        import pstats

        self.main.disable()
        asyncio.run_coroutine_threadsafe(self._toggle(False), self.loop).result()
        self.main.create_stats()
        self.background.create_stats()
        stats = pstats.Stats(self.main)
        stats.add(self.background)
        stats.dump_stats(path)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--client", choices=["aiohttp", "httpx", "gemframe"], required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--cache", default="off", help="gemframe cache mode (a fresh temp cache_dir)")
    parser.add_argument("--warmup", type=int, default=200, help="rows sent first, not measured")
    parser.add_argument("--repeat", type=int, default=1, help="measured batches (distinct prompts each)")
    parser.add_argument("--profile", help="write a cProfile of the last measured gemframe batch here")
    args = parser.parse_args()

    batches = [prompts(args.warmup, "warm")] if args.warmup else []
    batches += [prompts(args.rows, f"run{i}") for i in range(args.repeat)]
    if args.client == "gemframe":
        times = _gemframe(args.url, batches, args.concurrency, args.cache, args.profile)
    else:
        run = _aiohttp if args.client == "aiohttp" else _httpx
        times = asyncio.run(run(args.url, batches, args.concurrency))
    measured = times[1:] if args.warmup else times
    best = min(measured, key=lambda t: t["cpu_s"])
    emit(
        {
            "client": args.client,
            "rows": args.rows,
            "concurrency": args.concurrency,
            "cache": args.cache,
            "cpu_s": best["cpu_s"],
            "wall_s": best["wall_s"],
            "cpu_s_all": [t["cpu_s"] for t in measured],
            "wall_s_all": [t["wall_s"] for t in measured],
            "wrong": sum(int(t["wrong"]) for t in measured),
            "time": time.time(),
        }
    )


if __name__ == "__main__":
    main()
