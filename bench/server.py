"""A minimal, fast Gemini-compatible server for the benchmarks (a raw ASGI app under uvicorn).

    python bench/server.py --port 8123 --latency 0.2

- ``POST /v1beta/models/{model}:generateContent`` reads the whole body, waits ``latency``
  seconds (``asyncio.sleep``) and answers a small valid generateContent JSON: one candidate
  whose text is ``echo: <the first text part of the request>``, ``finishReason: STOP`` and
  ``usageMetadata``. Echoing the prompt lets a benchmark check that every row got its own
  answer; finding it is a byte search, not a JSON parse, so the server stays cheap.
- ``GET /stats`` returns ``{"requests", "bytes_in", "max_inflight", "cpu_s", "latency"}``.
- ``POST /reset`` zeroes the counters; ``POST /latency?s=0.2`` changes the latency.

It runs in its own process (see `_common.BenchServer`), so its CPU is never counted in a client's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

_HEADERS = [(b"content-type", b"application/json")]
_TEXT_MARK = b'"text":"'


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.bytes_in = 0
        self.inflight = 0
        self.max_inflight = 0


class BenchApp:
    """The ASGI app. ``latency`` is in seconds."""

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.stats = Stats()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if method == "POST" and path.endswith(":generateContent"):
            await self._generate(receive, send)
        elif path == "/stats":
            s = self.stats
            await _json(
                send,
                200,
                {
                    "requests": s.requests,
                    "bytes_in": s.bytes_in,
                    "max_inflight": s.max_inflight,
                    "cpu_s": time.process_time(),
                    "latency": self.latency,
                },
            )
        elif method == "POST" and path == "/reset":
            self.stats = Stats()
            await _json(send, 200, {"ok": True})
        elif method == "POST" and path == "/latency":
            query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if "=" in p)
            self.latency = float(query.get("s", self.latency))
            await _json(send, 200, {"latency": self.latency})
        else:
            await _json(send, 404, {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}})

    async def _generate(self, receive: Any, send: Any) -> None:
        stats = self.stats
        stats.requests += 1
        stats.inflight += 1
        stats.max_inflight = max(stats.max_inflight, stats.inflight)
        try:
            chunks = []
            more = True
            while more:
                message = await receive()
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            body = b"".join(chunks) if len(chunks) > 1 else chunks[0]
            stats.bytes_in += len(body)
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            start = body.find(_TEXT_MARK)
            prompt = b""
            if start >= 0:  # prompts in the benchmarks have no escaped quotes
                start += len(_TEXT_MARK)
                prompt = body[start : body.find(b'"', start)]
            words = prompt.count(b" ") + 1
            answer = (
                b'{"candidates":[{"content":{"role":"model","parts":[{"text":"echo: '
                + prompt
                + b'"}]},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":'
                + str(words).encode()
                + b',"candidatesTokenCount":'
                + str(words + 1).encode()
                + b',"totalTokenCount":'
                + str(2 * words + 1).encode()
                + b'},"modelVersion":"bench-server","responseId":"r'
                + str(stats.requests).encode()
                + b'"}'
            )
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            await send({"type": "http.response.body", "body": answer})
        finally:
            stats.inflight -= 1


async def _json(send: Any, status: int, value: Any) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": json.dumps(value).encode()})


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args()
    uvicorn.run(
        BenchApp(args.latency),
        host=args.host,
        port=args.port,
        access_log=False,
        log_level="warning",
        backlog=4096,
        timeout_keep_alive=60,
    )


if __name__ == "__main__":
    main()
