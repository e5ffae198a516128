"""Benchmark 3, latency-bound throughput: wall time against the ideal rows / concurrency x latency.

The server answers after 200 ms; with C requests in flight the best possible wall time is
``rows / C x 0.2 s``. Efficiency = ideal / measured wall. Every client (fresh process each) first
sends one warm-up round of C rows so its connections are open, as they would be mid-job.

raw httpx is slow enough at C=256 (its pool is O(connections) per request) that it is run on
fewer rows there; the efficiency is still comparable (it is a rate), the note says how many.
"""

from __future__ import annotations

from _common import BenchServer, Row, Section, run_worker
from _forkhost import DEFAULT_PRELOAD, HTTPX_PRELOAD

HOST_PRELOAD = DEFAULT_PRELOAD + HTTPX_PRELOAD  # quick mode: raw httpx is one of the clients

LATENCY = 0.2
SIZES = {
    # quick: C=16, as raw httpx's pool burns ~10 ms CPU per request with 64 waiting at 50 ms latency
    "quick": [dict(rows=64, concurrency=16, httpx_rows=32, goal=0.90)],
    "default": [
        dict(rows=2000, concurrency=64, httpx_rows=2000, goal=0.90),
        dict(rows=4000, concurrency=256, httpx_rows=1024, goal=0.85),
    ],
}


def run(mode: str) -> Section:
    configs = SIZES.get(mode, SIZES["default"])
    latency = 0.05 if mode == "quick" else LATENCY
    section = Section(
        "throughput",
        "3. Latency-bound throughput",
        f"server latency {latency * 1000:.0f} ms; efficiency = ideal wall (rows / concurrency x latency) / measured wall; "
        "one warm-up round first.",
    )
    with BenchServer(latency) as server:
        for cfg in configs:
            c = cfg["concurrency"]
            found = {}
            for client in ("aiohttp", "httpx", "gemframe"):
                rows = cfg["httpx_rows"] if client == "httpx" else cfg["rows"]
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
                        str(c),
                        "--warmup",
                        str(c),
                    ],
                )
                after = server.stats()
                ideal = rows / c * latency
                r.update(
                    rows=rows,
                    ideal=ideal,
                    eff=ideal / r["wall_s"],
                    max_inflight=after["max_inflight"],
                    server_cpu=after["cpu_s"] - before["cpu_s"],
                )
                server.reset()
                if r["wrong"]:
                    section.notes.append(f"{client} C={c}: {r['wrong']} wrong answers")
                found[client] = r
            base = found["aiohttp"]
            for client, r in found.items():
                is_gf = client == "gemframe"
                section.rows.append(
                    Row(
                        f"C={c}, {r['rows']:,} rows: {client} efficiency",
                        round(100 * r["eff"], 1),
                        round(100 * base["eff"], 1),
                        "raw aiohttp",
                        "% of ideal",
                        goal=f">= {cfg['goal']:.0%} of ideal" if is_gf else "",
                        met=r["eff"] >= cfg["goal"] if is_gf else None,
                        note=(
                            f"wall {r['wall_s']:.2f}s vs ideal {r['ideal']:.2f}s; client CPU {1000 * r['cpu_s'] / r['rows']:.2f} ms/req; "
                            f"server saw {r['max_inflight']} in flight, used {r['server_cpu']:.1f} CPU s"
                        ),
                    )
                )
    section.notes.append(
        "On this 2-core machine the server (another process, ~0.2 ms CPU per request) and the client "
        "share the cores: at C=256 and 200 ms that is 1,280 requests/s to answer and to send."
    )
    return section
