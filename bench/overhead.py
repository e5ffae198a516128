"""Benchmark 2, client overhead: CPU seconds per request at server latency 0, concurrency 64.

Each client runs in its own fresh process (`clients.py`) against the bench server (another
process), after a warm-up batch; the figure is the best of ``repeat`` measured batches of
``rows`` distinct prompts (the least disturbed by the machine). Baselines: raw aiohttp and raw
httpx loops. gemframe is measured with ``cache="off"`` and with ``cache="use"`` on a fresh
cache directory (keys + writes, as in real use); both include payload building, cache keys,
decoding and the Arrow struct.
"""

from __future__ import annotations

from _common import BenchServer, Row, Section, run_worker
from _forkhost import DEFAULT_PRELOAD, HTTPX_PRELOAD

HOST_PRELOAD = DEFAULT_PRELOAD + HTTPX_PRELOAD  # quick mode: raw httpx is one of the clients

SIZES = {
    # quick: every path once (2 rounds, so the interleaving and best-of merge run; 2 batches each)
    # at the smallest size; raw httpx costs ~8 ms CPU per request once hundreds queue at C=64.
    "quick": dict(rows=32, repeat=2, warmup=8, rounds=2),
    "default": dict(rows=5000, repeat=2, warmup=200, rounds=3),
}
GOAL = 1.5


def run(mode: str) -> Section:
    size = SIZES.get(mode, SIZES["default"])
    rows, concurrency = size["rows"], 64
    section = Section(
        "overhead",
        "2. Client overhead",
        f"{rows:,} rows, server latency 0, concurrency {concurrency}; CPU time of the client process "
        f"(all threads) per request, best of {size['rounds'] * size['repeat']} batch(es) ({size['rounds']} round(s) of "
        f"fresh processes, clients interleaved, {size['repeat']} batch(es) each after a {size['warmup']}-row warm-up). "
        "The goal is for cache='off' (issue 6); cache='use' adds one SQLite write transaction per group of "
        "answers as they arrive, so a killed job has already stored what it paid for.",
    )
    results: dict[str, dict] = {}
    with BenchServer(0.0) as server:
        for round_ in range(size["rounds"]):  # clients interleaved, so a slow spell hits all of them
            for name, client, cache, repeat in [
                ("aiohttp", "aiohttp", "off", size["repeat"]),
                ("httpx", "httpx", "off", 1),
                ("gemframe cache=off", "gemframe", "off", size["repeat"]),
                ("gemframe cache=use", "gemframe", "use", size["repeat"]),
            ]:
                if client == "httpx" and round_:
                    continue  # ~17x slower: one batch says enough
                before = server.stats()
                r = run_worker(
                    "clients.py",
                    [
                        "--client",
                        client,
                        "--url",
                        server.url,
                        "--rows",
                        str(rows),
                        "--concurrency",
                        str(concurrency),
                        "--cache",
                        cache,
                        "--warmup",
                        str(size["warmup"]),
                        "--repeat",
                        str(repeat),
                    ],
                )
                after = server.stats()
                sent = after["requests"] - before["requests"]
                expected = size["warmup"] + rows * repeat
                if r["wrong"] or sent != expected:
                    section.notes.append(f"{name}: {r['wrong']} wrong answers, {sent} requests (expected {expected}).")
                r["ms"] = 1000 * r["cpu_s"] / rows
                r["server_ms"] = 1000 * (after["cpu_s"] - before["cpu_s"]) / expected
                if name in results:
                    r["cpu_s_all"] = results[name]["cpu_s_all"] + r["cpu_s_all"]
                    if results[name]["ms"] <= r["ms"]:
                        r = {**results[name], "cpu_s_all": r["cpu_s_all"]}
                results[name] = r
    base = results["aiohttp"]["ms"]
    for name, r in results.items():
        is_gf = name == "gemframe cache=off"
        section.rows.append(
            Row(
                f"{name}: CPU per request",
                round(r["ms"], 4),
                round(base, 4),
                "raw aiohttp",
                "ms",
                goal=f"<= {GOAL}x" if is_gf else "",
                met=(r["ms"] / base <= GOAL) if is_gf else None,
                note=f"wall {r['wall_s']:.2f}s ({rows / r['wall_s']:,.0f} req/s); batches {', '.join(f'{c:.2f}' for c in r['cpu_s_all'])} CPU s",
            )
        )
    section.notes.append(
        "Server CPU per request (its own process, not counted above): "
        + ", ".join(f"{n} {r['server_ms']:.3f} ms" for n, r in results.items())
        + "."
    )
    return section
