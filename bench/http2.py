"""Benchmark 8, HTTP/2: does httpx's HTTP/2 (the ``h2`` extra) help many concurrent requests to one host?

    python bench/run_all.py --only http2                      # this benchmark alone (~2.5 minutes)
    python bench/http2.py serve --port 8443 --certfile C --keyfile K [--latency 0.2] [--max-streams 100]
    python bench/http2.py client --client aiohttp|httpx1|httpx2 --url URL --ca CA [--connections K] ...

The server is `server.BenchApp` (imported, not copied) under hypercorn, which speaks HTTP/1.1
and HTTP/2 over TLS and picks one per connection by ALPN, with a self-signed certificate from
``trustme`` on 127.0.0.1. Every client uses TLS, so HTTP/1.1 and HTTP/2 pay for the same
encryption (Google's endpoint is HTTPS). A thin wrapper around the app records, for every
generateContent request, the client's (address, port) - one per TCP connection - and the HTTP
version, served at ``GET /connections``.

Clients (each in a fresh process, same bodies and headers as `clients.py`, every answer parsed
and checked):

- ``aiohttp``: raw aiohttp HTTP/1.1, ``TCPConnector(limit=C)`` - gemframe's path, the baseline;
- ``httpx1``: raw ``httpx.AsyncClient`` HTTP/1.1, pool = C;
- ``httpx2``: raw ``httpx.AsyncClient(http2=True, verify=<the test CA>)``, limits = C. httpcore
  puts every request on one HTTP/2 connection per origin (a connection being set up counts as
  available), so ``--connections K`` spreads the rows over K clients of C/K each, i.e. K
  HTTP/2 connections.

Measured: (a) latency-bound efficiency at 200 ms (ideal wall / measured wall, ideal = rows / C x
latency), 2,000 rows at C=64 and 4,000 at C=256, after a warm-up round of C rows; (b) client CPU
per request at latency 0, C=64. The server advertises ``SETTINGS_MAX_CONCURRENT_STREAMS`` = 100
(hypercorn's default, and a common value for large HTTP/2 front ends), so one HTTP/2 connection
carries at most 100 requests at a time. httpcore itself also announces 100 and takes the
smaller of the two, so at C=256 a second server allowing 1,000 streams still sees 100 in flight.
Last, a server that closes each connection after 1,000 requests (hypercorn's
own default; over HTTP/2 a graceful GOAWAY) counts the requests each client loses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import shutil
import ssl
import sys
import tempfile
import urllib.request
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from _common import (
    BENCH,
    PYTHON,
    BenchServer,
    Row,
    Section,
    emit,
    prompts,
    run_worker,
    timed,
)
from _forkhost import HTTPX_PRELOAD

LATENCY = 0.2
EXTRA_DEPS = ("hypercorn", "h2", "trustme")
SERVER_STREAMS = 100  # SETTINGS_MAX_CONCURRENT_STREAMS advertised by the main server
MEASURABLE = 0.05  # "measurably helps": at least 5% better than the baseline
# Quick mode forks the servers and clients from a host with these imported (bench/_forkhost.py):
# none of them imports polars or gemframe.
HOST_PRELOAD = HTTPX_PRELOAD + (
    "aiohttp",
    "h2.connection",
    "hypercorn.asyncio",
    "hypercorn.config",
    "_common",
    "clients",
    "server",
)

# (label, worker client, HTTP/2 connections)
CLIENTS = [
    ("raw aiohttp HTTP/1.1", "aiohttp", 0),
    ("raw httpx HTTP/1.1", "httpx1", 0),
    ("raw httpx HTTP/2, 1 connection", "httpx2", 1),
    ("raw httpx HTTP/2, 4 connections", "httpx2", 4),
]
SIZES = {
    # quick: every client on every server kind once, at the smallest size (C=8: every connection is
    # a TLS handshake; raw httpx's HTTP/1.1 pool burns ~10 ms CPU per request with 64 waiting).
    "quick": dict(
        latency=0.05,
        throughput=[dict(rows=16, concurrency=8, httpx1_rows=8)],
        cpu=dict(rows=16, warmup=8, repeat=2, concurrency=8),
        uncapped=dict(concurrency=8),
        goaway=dict(rows=24, max_requests=6, concurrency=8),
    ),
    "default": dict(
        latency=LATENCY,
        throughput=[
            dict(rows=2000, concurrency=64, httpx1_rows=2000),
            dict(rows=4000, concurrency=256, httpx1_rows=1024),
        ],
        cpu=dict(rows=3000, warmup=200, repeat=2, concurrency=64),
        uncapped=dict(concurrency=256),  # the throughput run at this C is its baseline
        goaway=dict(rows=6000, max_requests=1000, concurrency=64),
    ),
}


def missing_deps() -> list[str]:
    missing = []
    for name in EXTRA_DEPS:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return missing


# --------------------------------------------------------------------------- the server


class CountingApp:
    """`server.BenchApp` plus a per-connection count of the generateContent requests."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.connections: set[tuple[Any, ...]] = set()
        self.versions: Counter[str] = Counter()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path.endswith(":generateContent"):
                self.connections.add(tuple(scope.get("client") or ()))
                self.versions[scope.get("http_version", "?")] += 1
            elif path == "/connections":
                from server import _json

                await _json(send, 200, {"connections": len(self.connections), "http_versions": dict(self.versions)})
                return
            elif path == "/reset":
                self.connections = set()
                self.versions = Counter()
        await self.app(scope, receive, send)


def serve(port: int, latency: float, certfile: str, keyfile: str, max_streams: int, max_requests: int) -> None:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config
    from server import BenchApp

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.certfile, config.keyfile = certfile, keyfile
    config.alpn_protocols = ["h2", "http/1.1"]
    config.h2_max_concurrent_streams = max_streams
    config.backlog = 4096
    config.keep_alive_timeout = 60
    config.keep_alive_max_requests = max_requests
    config.accesslog = None
    # At SIGTERM every client has exited; hypercorn's default 3 s wait for connections to close
    # is only spent on those a max-requests GOAWAY left half-open.
    config.graceful_timeout = 0.5
    config.loglevel = "WARNING"
    asyncio.run(hypercorn_serve(CountingApp(BenchApp(latency)), config))


class TLSBenchServer(BenchServer):
    """`serve()` in its own process, HTTPS on a free loopback port; ``stats()`` adds the
    connection count and HTTP versions of the generateContent requests since the last reset."""

    def __init__(
        self,
        latency: float,
        certs: dict[str, str],
        max_streams: int = SERVER_STREAMS,
        max_requests: int = 10**9,
    ) -> None:
        super().__init__(latency)
        self.max_requests = max_requests
        self.url = f"https://127.0.0.1:{self.port}"
        self.certs = certs
        self.max_streams = max_streams
        self._ssl = ssl.create_default_context(cafile=certs["ca"])

    def command(self) -> list[str]:
        return [
            PYTHON,
            str(BENCH / "http2.py"),
            "serve",
            "--port",
            str(self.port),
            "--latency",
            str(self.latency),
            "--certfile",
            self.certs["cert"],
            "--keyfile",
            self.certs["key"],
            "--max-streams",
            str(self.max_streams),
            "--max-requests",
            str(self.max_requests),
        ]

    def _call(self, path: str, method: str = "GET") -> dict[str, Any]:
        request = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(request, timeout=10, context=self._ssl) as answer:
            return json.loads(answer.read())

    def stats(self) -> dict[str, Any]:
        return {**self._call("/stats"), **self._call("/connections")}


def make_certs(directory: Path) -> dict[str, str]:
    """A throwaway CA and a certificate for 127.0.0.1 signed by it (PEM files)."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": directory / "ca.pem", "cert": directory / "cert.pem", "key": directory / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(paths["cert"]), append=i > 0)
    return {k: str(v) for k, v in paths.items()}


# --------------------------------------------------------------------------- the clients (worker side)


async def _aiohttp(
    url: str,
    ctx: ssl.SSLContext,
    batches: list[list[str]],
    concurrency: int,
    tolerate: bool = False,
) -> list[dict[str, Any]]:
    from clients import _aiohttp as raw_aiohttp

    return await raw_aiohttp(url, batches, concurrency, ssl=ctx, tolerate=tolerate, tally=_tally)


async def _httpx(
    url: str,
    ctx: ssl.SSLContext,
    batches: list[list[str]],
    concurrency: int,
    http2: bool,
    n_clients: int,
    tolerate: bool = False,
) -> list[dict[str, Any]]:
    import httpx
    from clients import HEADERS, body, endpoint

    target = endpoint(url)
    times = []
    per_client = math.ceil(concurrency / n_clients)
    limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
    async with contextlib.AsyncExitStack() as stack:
        pool = [
            await stack.enter_async_context(
                httpx.AsyncClient(headers=HEADERS, limits=limits, timeout=120, http2=http2, verify=ctx)
            )
            for _ in range(n_clients)
        ]
        slots = asyncio.Semaphore(concurrency)
        versions: Counter[str] = Counter()

        async def one(i: int, prompt: str) -> Any:
            content = body(prompt)
            async with slots:
                response = await pool[i % n_clients].post(target, content=content)
                raw = await response.aread()
            if i == 0:
                versions[response.http_version] += 1
            return json.loads(raw)

        for batch in batches:
            with timed() as t:
                answers = await asyncio.gather(*(one(i, p) for i, p in enumerate(batch)), return_exceptions=tolerate)
            times.append(_tally(t, answers, batch))
            times[-1]["http_version"] = "/".join(versions)
    return times


def _tally(t: dict[str, Any], answers: list[Any], batch: list[str]) -> dict[str, Any]:
    """Wrong answers, and failed requests (only with ``--tolerate-errors``: exceptions in ``answers``)."""
    from clients import check

    failed = [a for a in answers if isinstance(a, BaseException)]
    ok = [(a, p) for a, p in zip(answers, batch) if not isinstance(a, BaseException)]
    t["wrong"] = check([a for a, _ in ok], [p for _, p in ok])
    t["errors"] = len(failed)
    t["kinds"] = sorted({f"{type(e).__name__}: {(str(e) or repr(e.__cause__ or e.__context__))[:90]}" for e in failed})
    return t


def client_main(args: argparse.Namespace) -> None:
    ctx = ssl.create_default_context(cafile=args.ca)
    batches = [prompts(args.warmup, "warm")] if args.warmup else []
    batches += [prompts(args.rows, f"run{i}") for i in range(args.repeat)]
    if args.client == "aiohttp":
        times = asyncio.run(_aiohttp(args.url, ctx, batches, args.concurrency, args.tolerate_errors))
    else:
        times = asyncio.run(
            _httpx(
                args.url,
                ctx,
                batches,
                args.concurrency,
                args.client == "httpx2",
                max(1, args.connections),
                args.tolerate_errors,
            )
        )
    measured = times[1:] if args.warmup else times
    best = min(measured, key=lambda t: t["cpu_s"])
    emit(
        {
            "client": args.client,
            "rows": args.rows,
            "concurrency": args.concurrency,
            "cpu_s": best["cpu_s"],
            "wall_s": best["wall_s"],
            "cpu_s_all": [t["cpu_s"] for t in measured],
            "wall_s_all": [t["wall_s"] for t in measured],
            "wrong": sum(int(t["wrong"]) for t in measured),
            "errors": sum(int(t["errors"]) for t in measured),
            "error_kinds": sorted({k for t in measured for k in t["kinds"]}),
            "client_http_version": times[-1].get("http_version", "HTTP/1.1"),
        }
    )


# --------------------------------------------------------------------------- the benchmark


def _worker(
    server: TLSBenchServer,
    client: str,
    connections: int,
    rows: int,
    concurrency: int,
    warmup: int,
    repeat: int = 1,
    tolerate: bool = False,
) -> dict[str, Any]:
    server.reset()
    before = server.stats()
    r = run_worker(
        "http2.py",
        [
            "client",
            "--client",
            client,
            "--connections",
            str(connections),
            "--url",
            server.url,
            "--ca",
            server.certs["ca"],
            "--rows",
            str(rows),
            "--concurrency",
            str(concurrency),
            "--warmup",
            str(warmup),
            "--repeat",
            str(repeat),
            *(["--tolerate-errors"] if tolerate else []),
        ],
    )
    after = server.stats()
    expected = warmup + rows * repeat
    r.update(
        sent=after["requests"],
        expected=expected,
        connections=after["connections"],
        versions=after["http_versions"],
        max_inflight=after["max_inflight"],
        server_ms=1000 * (after["cpu_s"] - before["cpu_s"]) / max(1, after["requests"]),
    )
    return r


def _versions(r: dict[str, Any]) -> str:
    return ", ".join(f"HTTP/{v}" for v in sorted(r["versions"]))


def _check(section: Section, label: str, r: dict[str, Any]) -> None:
    if r["wrong"] or r["errors"] or r["sent"] != r["expected"]:
        section.notes.append(
            f"{label}: {r['wrong']} wrong answers, {r['errors']} failed requests, {r['sent']} requests reached the "
            f"server (expected {r['expected']})."
        )


def run(mode: str) -> Section:
    size = SIZES.get(mode, SIZES["default"])
    latency = size["latency"]
    section = Section(
        "http2",
        "8. HTTP/2",
        "`server.BenchApp` under hypercorn over TLS (self-signed CA from trustme; ALPN h2 + http/1.1) on 127.0.0.1, "
        f"advertising {SERVER_STREAMS} concurrent streams per HTTP/2 connection. (a) efficiency at {latency * 1000:.0f} ms "
        "latency = ideal wall (rows / C x latency) / measured wall, after a warm-up round of C rows; (b) client CPU "
        f"(process_time, all threads) per request at latency 0, C={size['cpu']['concurrency']}, {size['cpu']['rows']:,} rows, best of "
        f"{size['cpu']['repeat']} after a {size['cpu']['warmup']}-row warm-up. Connections = distinct client "
        "(address, port) pairs the server saw on generateContent requests, warm-up included. Baseline: raw aiohttp "
        "HTTP/1.1 (gemframe's path) in the same run.",
    )
    missing = missing_deps()
    if missing:
        section.notes.append(
            f'skipped: {", ".join(missing)} not importable (`pip install -e ".[bench]"` or ".[test]" installs them).'
        )
        return section
    versions = []
    for name in ("hypercorn", "h2", "httpx", "httpcore", "aiohttp", "trustme"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{name} {metadata.version(name)}")
    section.notes.append("versions: " + ", ".join(versions) + ".")

    workdir = Path(tempfile.mkdtemp(prefix="gf-bench-h2-"))
    try:
        certs = make_certs(workdir)
        with TLSBenchServer(latency, certs) as server:
            bases = _throughput(section, server, size, latency)
            with TLSBenchServer(latency, certs, max_streams=1000) as uncapped:
                _uncapped(section, uncapped, latency, bases[size["uncapped"]["concurrency"]])
            server.set_latency(0.0)
            _cpu(section, server, size["cpu"])
        with TLSBenchServer(0.0, certs, max_requests=size["goaway"]["max_requests"]) as goaway:
            _goaway(section, goaway, **size["goaway"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    section.notes.append(
        f"'helps?' = at least {MEASURABLE:.0%} better than raw aiohttp HTTP/1.1 in the same run (higher efficiency, "
        "lower CPU). On this 2-core machine client and server share the cores; the server's CPU per request "
        "(its own process) is in each row's details."
    )
    return section


def _throughput(
    section: Section, server: TLSBenchServer, size: dict[str, Any], latency: float
) -> dict[int, dict[str, Any]]:
    """Efficiency rows for every client; returns the raw aiohttp baseline per concurrency."""
    bases = {}
    for cfg in size["throughput"]:
        c = cfg["concurrency"]
        found = {}
        for label, client, conns in CLIENTS:
            rows = cfg["httpx1_rows"] if client == "httpx1" else cfg["rows"]
            r = _worker(server, client, conns, rows, c, warmup=c)
            r["eff"] = rows / c * latency / r["wall_s"]
            _check(section, f"{label} C={c}", r)
            found[label] = r
        bases[c] = base = found[CLIENTS[0][0]]
        for label, r in found.items():
            section.rows.append(_eff_row(label, r, base, c, latency))
    return bases


def _eff_row(label: str, r: dict[str, Any], base: dict[str, Any], c: int, latency: float, suffix: str = "") -> Row:
    is_h2 = r["client"] == "httpx2"
    ideal = r["rows"] / c * latency
    return Row(
        f"C={c}, {r['rows']:,} rows: {label}{suffix} efficiency",
        round(100 * r["eff"], 1),
        round(100 * base["eff"], 1),
        "raw aiohttp HTTP/1.1",
        "% of ideal",
        goal="helps? (>= 5% above baseline)" if is_h2 else "",
        met=r["eff"] >= base["eff"] * (1 + MEASURABLE) if is_h2 else None,
        note=(
            f"wall {r['wall_s']:.2f}s vs ideal {ideal:.2f}s; client CPU {1000 * r['cpu_s'] / r['rows']:.2f} ms/req; "
            f"**{r['connections']} TCP connection(s)** ({_versions(r)}); server saw {r['max_inflight']} in flight, "
            f"{r['server_ms']:.2f} ms CPU/req"
        ),
    )


def _uncapped(section: Section, server: TLSBenchServer, latency: float, base: dict[str, Any]) -> None:
    """One HTTP/2 connection at C=256 (``base``'s C) against a server allowing 1,000 streams:
    httpcore's own cap stays."""
    c, rows = base["concurrency"], base["rows"]
    r = _worker(server, "httpx2", 1, rows, c, warmup=c)
    r["eff"] = rows / c * latency / r["wall_s"]
    _check(section, f"raw httpx HTTP/2, 1 connection C={c} (1,000 streams)", r)
    section.rows.append(
        _eff_row("raw httpx HTTP/2, 1 connection", r, base, c, latency, " (server allows 1,000 streams)")
    )
    section.notes.append(
        "httpcore announces SETTINGS_MAX_CONCURRENT_STREAMS=100 itself and uses min(server's, 100), and opens no second "
        "connection while one is usable, so one httpx HTTP/2 client never has more than 100 requests in flight to a "
        f"host, whatever the server allows (the row with a 1,000-stream server: {r['max_inflight']} in flight at C={c}). "
        "Its ratio is to the main server's raw aiohttp run."
    )


def _goaway(section: Section, server: TLSBenchServer, rows: int, max_requests: int, concurrency: int) -> None:
    """A server that closes each connection after 1,000 requests (hypercorn's ``keep_alive_max_requests``
    default). Over HTTP/1.1 that is ``Connection: close`` on the 1,000th answer; over HTTP/2 hypercorn
    calls h2's ``close_connection()`` - a GOAWAY with NO_ERROR, after which it sends nothing more, so
    the streams still in flight are abandoned. This measures how many requests one connection close
    takes down (the blast radius), not a well-behaved two-phase GOAWAY.

    6,000 rows, so every connection reaches the limit at least once: raw aiohttp at C=4 (4
    connections of ~1,500 requests; HTTP/1.1 has one request per connection in flight at any
    C), HTTP/2 at C=64 on 1 connection (~6 GOAWAYs) and on 4 (~1,500 requests each). (Quick: 24 rows,
    a close after 6 requests, C=8.)"""
    for label, client, conns in CLIENTS:
        if client == "httpx1":
            continue
        c = 4 if client == "aiohttp" else concurrency
        r = _worker(server, client, conns, rows, c, warmup=0, tolerate=True)
        lost = r["sent"] - (rows - r["errors"])
        section.rows.append(
            Row(
                f"server drops each connection after {max_requests:,} requests: {label}, C={c}: failed requests",
                r["errors"],
                0,
                "none expected",
                f"of {rows:,}",
                note=(
                    f"**{r['connections']} TCP connection(s)** ({_versions(r)}); {r['sent']:,} requests reached the server, "
                    f"{lost:,} of them run by the app but never answered; "
                    + ("; ".join(r["error_kinds"]) or "no errors")
                ),
            )
        )
    section.notes.append(
        "Connection drops: hypercorn's max-requests close over HTTP/2 is a GOAWAY after which it sends nothing, so "
        "the failures are as much the server's as httpx's (httpcore does not retry streams either: "
        "encode/httpcore#45). What the rows show is the blast radius: an HTTP/1.1 close costs at most the one "
        "request on that connection (aiohttp reconnects, none lost); an HTTP/2 close takes down every stream in "
        "flight on it (up to 100), most of them already run by the server, so a retry would pay twice."
    )


def _cpu(section: Section, server: TLSBenchServer, size: dict[str, Any]) -> None:
    c = size["concurrency"]
    found = {}
    for label, client, conns in CLIENTS:
        repeat = 1 if client == "httpx1" else size["repeat"]
        r = _worker(server, client, conns, size["rows"], c, warmup=size["warmup"], repeat=repeat)
        _check(section, f"{label} CPU", r)
        r["ms"] = 1000 * r["cpu_s"] / size["rows"]
        found[label] = r
    base = found[CLIENTS[0][0]]["ms"]
    for label, r in found.items():
        is_h2 = r["client"] == "httpx2"
        section.rows.append(
            Row(
                f"latency 0, C={c}: {label} CPU per request",
                round(r["ms"], 4),
                round(base, 4),
                "raw aiohttp HTTP/1.1",
                "ms",
                goal="helps? (>= 5% below baseline)" if is_h2 else "",
                met=r["ms"] <= base * (1 - MEASURABLE) if is_h2 else None,
                note=(
                    f"wall {r['wall_s']:.2f}s ({size['rows'] / r['wall_s']:,.0f} req/s); batches "
                    f"{', '.join(f'{x:.2f}' for x in r['cpu_s_all'])} CPU s; **{r['connections']} TCP connection(s)** "
                    f"({_versions(r)}); server {r['server_ms']:.3f} ms CPU/req"
                ),
            )
        )


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="the TLS HTTP/1.1 + HTTP/2 bench server (hypercorn)")
    s.add_argument("--port", type=int, default=8443)
    s.add_argument("--latency", type=float, default=0.0)
    s.add_argument("--certfile", required=True)
    s.add_argument("--keyfile", required=True)
    s.add_argument("--max-streams", type=int, default=SERVER_STREAMS)
    s.add_argument(
        "--max-requests",
        type=int,
        default=10**9,
        help="requests per connection before it is closed "
        "(HTTP/2: a graceful GOAWAY); hypercorn's own default is 1,000",
    )
    c = sub.add_parser("client", help="one client worker; prints one JSON line")
    c.add_argument("--client", choices=["aiohttp", "httpx1", "httpx2"], required=True)
    c.add_argument("--connections", type=int, default=1, help="httpx: this many AsyncClients (HTTP/2: connections)")
    c.add_argument("--url", required=True)
    c.add_argument("--ca", required=True, help="PEM of the CA that signed the server's certificate")
    c.add_argument("--rows", type=int, default=3000)
    c.add_argument("--concurrency", type=int, default=64)
    c.add_argument("--warmup", type=int, default=200)
    c.add_argument("--repeat", type=int, default=1)
    c.add_argument("--tolerate-errors", action="store_true", help="count failed requests instead of stopping")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.port, args.latency, args.certfile, args.keyfile, args.max_streams, args.max_requests)
    else:
        client_main(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
