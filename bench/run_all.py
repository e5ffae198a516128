"""Run every gemframe benchmark and write bench/RESULTS.md.

    python bench/run_all.py            # the suite (~5 minutes on 2 cores)
    python bench/run_all.py --quick    # tiny sizes, ~15 s, writes bench/RESULTS_quick.md: a smoke test
                                       # (its processes forked from one pre-imported host: bench/_forkhost.py)
    python bench/run_all.py --full --only memory --out bench/RESULTS_1M.md   # the 1M-row memory run

Every figure is compared with a baseline measured in the same run, on this machine: raw aiohttp
/ httpx loops against the same local server, diskcache read directly, an import-only process,
polars' eager path. Only 127.0.0.1 is contacted. Timings are never asserted: a missed goal is
reported in the table, not raised. The exit code is non-zero only if a benchmark failed to run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH, DEFAULT_PRELOAD, Section, fmt, forked_processes, machine

MODULES = [
    "overhead",
    "throughput",
    "cached",
    "memory",
    "images",
    "streaming",
    "http2",
    "rate_limits",
    "url_images",
    "shared_media",
]
TITLES = {
    "overhead": "2. Client overhead",
    "throughput": "3. Latency-bound throughput",
    "cached": "4. Cached rerun",
    "memory": "5. Streaming memory (`gemframe run`)",
    "images": "6. Images",
    "streaming": "7. Polars streaming engine",
    "http2": "8. HTTP/2",
    "rate_limits": "9. Rate limits not told",
    "url_images": "10. Image URLs",
    "shared_media": "11. Shared media (Files API)",
}
_MODULE_FILES = {"streaming": "polars_streaming"}


def run_section(name: str, mode: str) -> Section:
    module = __import__(_MODULE_FILES.get(name, name))
    start = time.perf_counter()
    try:
        section = module.run(mode)
    except Exception as exc:  # report it and go on with the other benchmarks
        section = Section(name, TITLES[name], "", error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    section.seconds = time.perf_counter() - start
    return section


def quick_preload(names: list[str]) -> tuple[str, ...]:
    """What the fork host imports for these benchmarks (each module's ``HOST_PRELOAD``)."""
    modules = (__import__(_MODULE_FILES.get(name, name)) for name in names)
    return tuple(dict.fromkeys(m for module in modules for m in getattr(module, "HOST_PRELOAD", DEFAULT_PRELOAD)))


def render(sections: list[Section], mode: str, command: str, total_s: float, load: tuple[str, str]) -> str:
    info = machine()
    info["load average (1/5/15 min)"] = f"{load[0]} at start, {load[1]} at end (other work on the machine adds noise)"
    lines = [
        "# gemframe benchmarks",
        "",
        f"Produced by `{command}` ({mode} sizes) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"in {total_s:.0f} s. Every ratio is gemframe / a baseline measured in the same run on the same machine; "
        "goals are those of issue 6. The server is `bench/server.py` (a raw ASGI app under uvicorn, in its own "
        "process, on 127.0.0.1) answering a small generateContent JSON after a configurable latency.",
        "",
        *(
            [
                "**Quick sizes**: a smoke test that the suite runs; at these sizes start-up dominates and the goals "
                "are not meaningful.",
                "",
            ]
            if mode == "quick"
            else []
        ),
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items()),
        "",
        "## Summary",
        "",
        "| benchmark | measure | gemframe | baseline | ratio | goal | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in sections:
        if s.error:
            lines.append(f"| {s.title} | **failed to run** | | | | | |")
            continue
        for r in s.rows:
            if r.goal:
                lines.append(
                    f"| {s.title} | {r.metric} | {fmt(r.value)} {r.unit} | {fmt(r.baseline)} ({r.baseline_name}) "
                    f"| {fmt(r.ratio)} | {r.goal} | {fmt(r.met)} |"
                )
    for s in sections:
        lines += ["", f"## {s.title}", ""]
        if s.error:
            lines += ["```", s.error.strip(), "```"]
            continue
        lines += [
            s.setup,
            "",
            "| measure | value | baseline | ratio | goal | met? | details |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in s.rows:
            baseline = f"{fmt(r.baseline)} {r.unit} ({r.baseline_name})" if r.baseline is not None else ""
            lines.append(
                f"| {r.metric} | {fmt(r.value)} {r.unit} | {baseline} | {fmt(r.ratio)} | {r.goal} "
                f"| {fmt(r.met) if r.met is not None else ''} | {r.note} |"
            )
        lines += [""] + [f"- {n}" for n in s.notes] + [f"- ran in {s.seconds:.0f} s."]
    return "\n".join(lines) + "\n"


def _load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the suite)")
    size.add_argument(
        "--full", action="store_true", help="the memory benchmark at 100k and 1M rows (~10 extra minutes)"
    )
    parser.add_argument("--only", nargs="+", choices=MODULES, help="run only these benchmarks")
    parser.add_argument(
        "--out",
        help="where to write the results (default: bench/RESULTS.md; "
        "bench/RESULTS_quick.md with --quick, so a smoke run never overwrites the real results)",
    )
    args = parser.parse_args()
    mode = "quick" if args.quick else "full" if args.full else "default"
    args.out = args.out or str(BENCH / ("RESULTS_quick.md" if args.quick else "RESULTS.md"))
    command = "python bench/run_all.py" + "".join(f" {a}" for a in sys.argv[1:])
    start = time.perf_counter()
    load_start = _load()
    sections = []
    host = contextlib.ExitStack()
    if args.quick:  # a smoke run forks its python processes from one host that imported them (once, here)
        host.enter_context(forked_processes(quick_preload(args.only or MODULES)))
    for name in args.only or MODULES:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        section = run_section(name, mode)
        sections.append(section)
        status = (
            "FAILED"
            if section.error
            else ", ".join(
                f"{r.metric}: {fmt(r.value)} {r.unit}" + (f" ({fmt(r.ratio)}x)" if r.ratio is not None else "")
                for r in section.rows
            )
        )
        print(f"[bench] {name} done in {section.seconds:.0f}s: {status}", file=sys.stderr, flush=True)
        if section.error:
            print(section.error, file=sys.stderr)
    host.close()
    total = time.perf_counter() - start
    Path(args.out).write_text(render(sections, mode, command, total, (load_start, _load())))
    print(f"[bench] wrote {args.out} in {total:.0f}s", file=sys.stderr)
    return 1 if any(s.error for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
