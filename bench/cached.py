"""Benchmark 4, cached rerun: N distinct rows, all in the cache, answered again.

    python bench/cached.py --url URL --rows 100000 [--profile OUT.pstats]     # one worker run

The cache is filled through the public API, the fastest way there is: for each prompt the key
gemframe computes (`gf.cache_key` of `gf.RequestBuilder().build(prompt)`) and the answer the
bench server would give, stored with `gf.ResponseCache.set_many`. The rerun is the real thing,
``frame.with_columns(reply=gf.generate("prompt", client=...))`` with ``cache="use"`` against the
bench server; the caller checks the server's request counter did not move (a key that did not
match would be sent, and counted).

Baseline (same process, same cache): the storage floor, i.e. the same keys read back with
``diskcache`` directly in one transaction per 1,024 keys, each answer ``json.loads``-ed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

from _common import API_KEY, MODEL, BenchServer, Row, Section, emit, prompts, run_worker, timed

SIZES = {"quick": 500, "default": 100_000}
GOAL = 50_000  # rows/s


def answer(prompt: str, i: int) -> bytes:
    """What the bench server answers for this prompt (same shape, same echo)."""
    words = prompt.count(" ") + 1
    return (
        '{"candidates":[{"content":{"role":"model","parts":[{"text":"echo: %s"}]},"finishReason":"STOP",'
        '"index":0}],"usageMetadata":{"promptTokenCount":%d,"candidatesTokenCount":%d,"totalTokenCount":%d},'
        '"modelVersion":"bench-server","responseId":"c%d"}' % (prompt, words, words + 1, 2 * words + 1, i)
    ).encode()


def fill(cache_dir: str, texts: list[str], provider: str = "google", model: str = MODEL, chunk: int = 20_000) -> float:
    """Store an answer for every prompt under gemframe's own key; returns the seconds it took."""
    import gemframe as gf

    builder = gf.RequestBuilder()
    store = gf.ResponseCache(cache_dir)
    start = time.perf_counter()
    for lo in range(0, len(texts), chunk):
        store.set_many(
            (gf.cache_key(builder.build(p), provider=provider, model=model), model, answer(p, lo + i))
            for i, p in enumerate(texts[lo : lo + chunk])
        )
    store.close()
    return time.perf_counter() - start


def baseline(cache_dir: str, texts: list[str], batch: int = 1024) -> float:
    """Seconds to read every answer back with diskcache directly (batched transactions)."""
    import diskcache

    import gemframe as gf

    builder = gf.RequestBuilder()
    keys = [gf.cache_key(builder.build(p), provider="google", model=MODEL) for p in texts]
    store = diskcache.Cache(cache_dir)
    with timed() as t:
        found = 0
        for lo in range(0, len(keys), batch):
            with store.transact():
                for key in keys[lo : lo + batch]:
                    entry = store.get(key)
                    if entry is not None:
                        json.loads(entry.partition(b"\n")[2])
                        found += 1
    store.close()
    assert found == len(keys), f"baseline found {found} of {len(keys)}"
    return t["wall_s"]


def _start_profiler(path: str):
    """pyinstrument (sampling, 1 ms) for ``*.pyisession``, else cProfile (this path is one thread)."""
    if path.endswith(".pyisession"):
        import pyinstrument

        profiler = pyinstrument.Profiler(interval=0.001)
    else:
        import cProfile

        profiler = cProfile.Profile()
    profiler.start() if hasattr(profiler, "start") else profiler.enable()
    return profiler


def _stop_profiler(profiler, path: str) -> None:
    if path.endswith(".pyisession"):
        profiler.stop()
        profiler.last_session.save(path)
    else:
        profiler.disable()
        profiler.dump_stats(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--profile", help="profile the first rerun into this file (.pyisession: pyinstrument, else cProfile)"
    )
    args = parser.parse_args()

    import polars as pl

    import gemframe as gf

    texts = prompts(args.rows, "cached")
    cache_dir = tempfile.mkdtemp(prefix="gf-bench-cached-")
    fill_s = fill(cache_dir, texts)
    frame = pl.DataFrame({"id": range(args.rows), "prompt": texts})
    client = gf.Client(
        "google",
        api_key=API_KEY,
        base_url=args.url,
        model=MODEL,
        concurrency=args.concurrency,
        cache="use",
        cache_dir=cache_dir,
        progress=False,
    )
    expr = gf.generate("prompt", client=client)
    runs = []
    for i in range(2):
        profiler = _start_profiler(args.profile) if args.profile and i == 0 else None
        with timed() as t:
            out = frame.with_columns(reply=expr)
        if profiler:
            _stop_profiler(profiler, args.profile)
        replies = out["reply"].struct
        t["all_cached"] = bool(replies.field("cached").all())
        t["wrong"] = int((replies.field("text") != ("echo: " + out["prompt"])).sum())
        t["errors"] = int(replies.field("error").is_not_null().sum())
        runs.append(t)
    client.close()
    base_s = baseline(cache_dir, texts)
    shutil.rmtree(cache_dir, ignore_errors=True)
    emit(
        {
            "rows": args.rows,
            "fill_s": fill_s,
            "runs": runs,
            "baseline_s": base_s,
            "order_ok": out["id"].to_list() == list(range(args.rows)),
        }
    )


def run(mode: str) -> Section:
    rows = SIZES.get(mode, SIZES["default"])
    section = Section(
        "cached",
        "4. Cached rerun",
        f"{rows:,} distinct rows, every answer already in the cache (filled with `gf.ResponseCache.set_many` "
        "under `gf.cache_key`); `with_columns(reply=gf.generate(...))` with cache='use' against the bench "
        "server. Baseline: the same entries read straight from diskcache (batched transactions) + `json.loads`.",
    )
    with BenchServer(0.0) as server:
        r = run_worker("cached.py", ["--url", server.url, "--rows", str(rows)])
        sent = server.stats()["requests"]
    first, second = r["runs"]
    rate = rows / first["wall_s"]
    base_rate = rows / r["baseline_s"]
    section.rows.append(
        Row(
            "rerun rate",
            round(rate),
            round(base_rate),
            "diskcache read + json.loads",
            "rows/s",
            goal=f">= {GOAL:,} rows/s",
            met=rate >= GOAL,
            note=f"{first['wall_s']:.2f}s for {rows:,} rows; a second rerun: {rows / second['wall_s']:,.0f} rows/s",
        )
    )
    section.rows.append(
        Row(
            "requests reaching the server",
            sent,
            0,
            "none",
            "requests",
            goal="0",
            met=sent == 0,
            note=f"all rows cached: {first['all_cached'] and second['all_cached']}; wrong answers {first['wrong'] + second['wrong']}; "
            f"errors {first['errors'] + second['errors']}; order kept: {r['order_ok']}",
        )
    )
    section.notes.append(
        f"Filling the cache took {r['fill_s']:.1f}s; the worker's peak RSS was {r['peak_rss_mb']:.0f} MiB."
    )
    return section


if __name__ == "__main__":
    main()
