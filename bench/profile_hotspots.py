"""Profile gemframe's hot paths (benchmarks 2 and 4) and write bench/PROFILE.md.

    python bench/profile_hotspots.py [--rows 5000] [--cached-rows 100000]

- Client overhead (benchmark 2): 5,000 rows, latency 0, concurrency 64, cache off and cache use.
  cProfile with ``time.thread_time`` on the caller thread *and* on gemframe's event-loop thread
  (merged), so each function is charged its own thread's CPU, not wall time or the other thread's.
  Threads other than these two (e.g. a thread pool the HTTP client hands work to) are not
  profiled, though their CPU is in benchmark 2's figure.
- Cached rerun (benchmark 4): 100,000 cached rows, all on the calling thread, profiled by
  pyinstrument when installed (`pip install pyinstrument`; sampling every 1 ms, less overhead than
  cProfile), else cProfile. Cyclic-GC pauses are charged to whichever function was allocating.

cProfile's per-call overhead inflates call-heavy code (its totals are several times the
unprofiled CPU time): for the overhead profiles read the shares, not the seconds. Profiles are
saved in ``bench/profiles/`` (``python -m pstats FILE``; ``pyinstrument --load FILE``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH, BenchServer, machine, run_worker
from _profiles import summary


def section(title: str, path: Path, note: str) -> list[str]:
    data = summary(str(path), 25)
    total = data["total"][0][1]
    lines = [
        f"## {title}",
        "",
        note,
        "",
        f"Profiled total: {total:.2f} s.",
        "",
        "| package | self CPU s | share |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {sec:.3f} | {sec / total:.1%} |" for name, sec in data["by_package"][:12]]
    lines += [
        "",
        "Top gemframe functions by cumulative CPU:",
        "",
        "| function | cumulative s | share |",
        "|---|---|---|",
    ]
    lines += [f"| `{name}` | {sec:.3f} | {sec / total:.1%} |" for name, sec in data["gemframe"][:20]]
    lines += ["", "Top functions by self CPU (any package):", "", "| function | self s | share |", "|---|---|---|"]
    lines += [f"| `{name}` | {sec:.3f} | {sec / total:.1%} |" for name, sec in data["self"][:20]]
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--cached-rows", type=int, default=100_000)
    parser.add_argument("--out", default=str(BENCH / "PROFILE.md"))
    args = parser.parse_args()
    out_dir = BENCH / "profiles"
    out_dir.mkdir(exist_ok=True)
    lines = [
        "# gemframe hot-path profiles",
        "",
        f"Produced by `python bench/profile_hotspots.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"({machine()['nproc']} cores, {machine()['python']}).",
        "",
        __doc__.split("\n\n", 1)[1].strip(),
        "",
    ]
    with BenchServer(0.0) as server:
        for cache in ("off", "use"):
            path = out_dir / f"overhead_cache_{cache}.pstats"
            r = run_worker(
                "clients.py",
                [
                    "--client",
                    "gemframe",
                    "--url",
                    server.url,
                    "--rows",
                    str(args.rows),
                    "--concurrency",
                    "64",
                    "--cache",
                    cache,
                    "--profile",
                    str(path),
                ],
            )
            lines += section(
                f"Client overhead, cache={cache}",
                path,
                f"{args.rows:,} rows at concurrency 64, latency 0 (profiled run: {r['cpu_s']:.2f} CPU s, {r['wall_s']:.2f} s wall).",
            )
        try:
            import pyinstrument  # noqa: F401

            path = out_dir / "cached_rerun.pyisession"
        except ImportError:
            path = out_dir / "cached_rerun.pstats"
        r = run_worker("cached.py", ["--url", server.url, "--rows", str(args.cached_rows), "--profile", str(path)])
        first = r["runs"][0]
        lines += section(
            "Cached rerun",
            path,
            f"{args.cached_rows:,} cached rows (profiled run: {first['wall_s']:.2f} s; unprofiled second run "
            f"{r['runs'][1]['wall_s']:.2f} s).",
        )
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
