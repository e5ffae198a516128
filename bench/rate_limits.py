"""Benchmark 9, rate limits the client is not told about (issue "Trust at the edges", 12-13).

Two servers (tests/fault_server.py, raw asyncio on 127.0.0.1, in this process; each client in a
fresh process), both answering after 200 ms:

- **random 429s**: 20% of attempts answered 429 whatever the rate (a shared project quota, a
  momentary overload), with RetryInfo ``retryDelay`` 1.5 s; and 3% (right at the share that
  trips a cut) on a fast job. Slowing down cannot help, so the default client must not be
  slower than the same client with ``adaptive=False``: goal within 1.2x of its wall time.
  Which attempts fail is a pure function of (seed, body, attempt), so both clients meet the
  very same 429s.
- **a real limit**: a token bucket of R requests/min (1 s of burst allowance). The default
  client, not told R, must sustain >= 90% of R with <= 5% of attempts answered 429, counted at
  the server from the first request. The baseline is the same client told ``rpm=R``.

Both clients use slow start (the executor's window opens as answers succeed), so the
comparison isolates the adaptive rate.

    python bench/rate_limits.py            # this benchmark alone, prints its table
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from _common import ROOT, Row, Section, emit, fmt, run_worker

LATENCY = 0.2
SIZES = {
    "quick": dict(  # the code path, not the figures: short delays and latency, so it takes seconds
        random=[dict(share=0.1, retry_delay="0.2s", rows=20, latency=0.05)],
        limits=[dict(rpm=600, rows=16, concurrency=16, latency=0.05)],  # 10 of burst, then 429s
    ),
    "default": dict(
        random=[
            dict(share=0.2, retry_delay="1.5s", rows=500, latency=LATENCY),  # the case
            dict(share=0.03, retry_delay=None, rows=10000, latency=0.05),  # a small share on a fast job
        ],
        limits=[
            dict(rpm=6000, rows=2000, concurrency=64),  # as tests/test_faults.py
            dict(rpm=600, rows=600, concurrency=16),  # the 10 requests/s, default concurrency
        ],
    ),
}


def _server(**knobs):
    sys.path.insert(0, str(ROOT))
    from tests.fault_server import FaultServer

    return FaultServer(**knobs).start()


def _client(server, rows: int, concurrency: int, *options: str) -> dict:
    result = run_worker(
        "rate_limits.py",
        [
            "--worker",
            "--url",
            server.url,
            "--rows",
            str(rows),
            "--concurrency",
            str(concurrency),
            *options,
        ],
    )
    stats = server.stats
    result["requests"] = stats.requests
    result["share_429"] = stats.statuses["429"] / max(stats.requests, 1)
    span = (stats.last_success or 0) - (stats.times[0] if stats.times else 0)
    result["served_per_s"] = rows / span if span > 0 else 0.0  # first request to last answer, at the server
    server.stop()
    return result


def _random_429s(section: Section, share: float, retry_delay: str | None, rows: int, latency: float) -> None:
    """One random-429 row: the default client's wall time against ``adaptive=False``'s."""
    found = {}
    for name, options in (("fixed", ["--fixed"]), ("default", [])):
        server = _server(seed=1, fault_rate=share, faults=("429",), retry_delay=retry_delay, latency=latency)
        found[name] = _client(server, rows, 64, *options)
    fixed, default = found["fixed"], found["default"]
    ratio = default["wall_s"] / fixed["wall_s"]
    delay = f"retryDelay {retry_delay}" if retry_delay else "no retryDelay"
    section.rows.append(
        Row(
            f"random 429s, {share:.0%} ({delay}), {rows:,} rows, latency {latency * 1000:.0f} ms: wall time",
            round(default["wall_s"], 2),
            round(fixed["wall_s"], 2),
            "adaptive=False",
            "s",
            goal="<= 1.2x",
            met=ratio <= 1.2,
            note=f"{fmt(default['share_429'] * 100)}% of {default['requests']} attempts 429 (fixed: {fixed['requests']}); "
            f"limiter at the end: rate {default['rate']}, background 429 share {default['floor']:.2f}, "
            f"{default['cuts']} cuts, {default['undone']} undone",
        )
    )


def run(mode: str) -> Section:
    size = SIZES.get(mode, SIZES["default"])
    section = Section(
        "rate_limits",
        "9. Rate limits not told",
        f"server latency {LATENCY * 1000:.0f} ms{' (quick sizes: 50 ms)' if mode == 'quick' else ''} "
        "(tests/fault_server.py on 127.0.0.1, client in its own process). "
        "Random 429s: at C=64, a share of attempts 429 whatever the rate, the same attempts for both clients "
        "(seed 1). Real limit: a token bucket of R requests/min with 1 s of burst; 429 share and rate "
        "counted at the server from the first request to the last answer.",
    )
    # Random 429s: the default client against adaptive=False on the very same faults.
    for case in size["random"]:
        _random_429s(section, **case)

    # A real limit: the default client not told it, against the same client told it.
    for cfg in size["limits"]:
        rpm, rows, c = cfg["rpm"], cfg["rows"], cfg["concurrency"]
        rate = rpm / 60.0
        found = {}
        for name, options in (("told", ["--rpm", str(rpm)]), ("default", [])):
            server = _server(rpm=rpm, latency=cfg.get("latency", LATENCY))
            found[name] = _client(server, rows, c, *options)
        told, default = found["told"], found["default"]
        label = f"limit {rpm:,}/min, {rows:,} rows, C={c}"
        section.rows.append(
            Row(
                f"{label}: sustained rate",
                round(100 * default["served_per_s"] / rate, 1),
                round(100 * told["served_per_s"] / rate, 1),
                f"told rpm={rpm}",
                "% of the limit",
                goal=">= 90% of the limit",
                met=default["served_per_s"] >= 0.9 * rate,
                ratio=default["served_per_s"] / told["served_per_s"],
                note=f"{default['served_per_s']:.2f} vs {told['served_per_s']:.2f} requests/s; wall {default['wall_s']:.1f} s vs "
                f"{told['wall_s']:.1f} s; {default['cuts']} cuts, {default['undone']} undone",
            )
        )
        section.rows.append(
            Row(
                f"{label}: attempts answered 429",
                round(100 * default["share_429"], 2),
                round(100 * told["share_429"], 2),
                f"told rpm={rpm}",
                "%",
                goal="<= 5%",
                met=default["share_429"] <= 0.05,
                ratio=None,
                note=f"{round(default['share_429'] * default['requests'])} of {default['requests']} attempts",
            )
        )
    section.notes.append(
        "Before this change (issue 'Trust at the edges'): 88-98 s for the random-429 job against 6.6-7.7 s with "
        "adaptive=False (13-15x), and 34-39% of all attempts answered 429 against a 10 requests/s limit."
    )
    return section


def worker(args: argparse.Namespace) -> None:
    """One gemframe client sending ``rows`` prompts; prints one JSON line."""
    import polars as pl

    import gemframe as gf

    options = dict(concurrency=args.concurrency, adaptive=not args.fixed, rpm=args.rpm, progress=False, timeout=30)
    with (
        tempfile.TemporaryDirectory() as cache,
        gf.Client("google", api_key="bench", base_url=args.url, cache_dir=cache, **options) as client,
    ):
        frame = pl.DataFrame({"prompt": [f"rate limit prompt {i}" for i in range(args.rows)]})
        start = time.perf_counter()
        out = frame.with_columns(reply=gf.generate("prompt", client=client)).unnest("reply")
        wall = time.perf_counter() - start
        adaptive = client.executor.limiter.adaptive
        state = dict(rate=None, floor=0.0, cuts=0, undone=0)
        if adaptive is not None:
            state = dict(
                rate=adaptive.rate and round(adaptive.rate, 1),
                floor=adaptive.floor,
                cuts=adaptive.cuts,
                undone=adaptive.undone,
            )
    emit(dict(wall_s=wall, errors=int(out["error"].is_not_null().sum()), **state))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url")
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--fixed", action="store_true", help="adaptive=False")
    parser.add_argument("--rpm", type=float)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    section = run("quick" if args.quick else "default")
    for row in section.rows:
        print(
            f"{row.metric}: {fmt(row.value)} {row.unit} (baseline {fmt(row.baseline)}, ratio {fmt(row.ratio)}, "
            f"goal {row.goal}, met {fmt(row.met)}) {row.note}"
        )


if __name__ == "__main__":
    main()
