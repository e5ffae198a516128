"""Time a fresh and a fully cached run of N rows on the in-process emulator.

    python bench/emulator_run.py --rows 1000 --latency 0.05 --concurrency 32

Reports wall time against the ideal (rows / concurrency x latency) and the cached rerun's rate.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import polars as pl

import gemframe as gf
from gemframe.emulator import Emulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    emulator = Emulator(latency=args.latency)
    frame = pl.DataFrame({"prompt": [f"benchmark prompt number {i}" for i in range(args.rows)]})
    with tempfile.TemporaryDirectory() as cache_dir:
        client = gf.Client(
            gf.EmulatorProvider(app=emulator), concurrency=args.concurrency, cache_dir=cache_dir, progress=False
        )
        expr = gf.generate("prompt", client=client)
        start = time.perf_counter()
        fresh = frame.with_columns(reply=expr)
        fresh_s = time.perf_counter() - start
        sent = emulator.stats.requests
        start = time.perf_counter()
        cached = frame.with_columns(reply=expr)
        cached_s = time.perf_counter() - start
        client.close()
    ideal = args.rows / args.concurrency * args.latency
    assert fresh["reply"].struct.field("error").is_null().all()
    assert cached["reply"].struct.field("cached").all() and emulator.stats.requests == sent
    print(
        f"fresh : {args.rows} rows in {fresh_s:.2f}s  (ideal {ideal:.2f}s, {ideal / fresh_s:.0%} of ideal), {sent} requests"
    )
    print(f"cached: {args.rows} rows in {cached_s:.3f}s ({args.rows / cached_s:,.0f} rows/s), 0 requests")


if __name__ == "__main__":
    main()
