"""A misbehaving Gemini-like HTTP server for fault tests, on 127.0.0.1 only.

Written on raw asyncio streams (not a framework) so it can do what real servers and proxies do
to us: reset connections, cut bodies short, answer HTML with 200, stall, throttle. Faults are
deterministic: whether attempt N of a given body fails, and how, is a pure function of
(seed, body, N). It counts attempts and successes per distinct body and the peak in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

FAULTS = ("429", "500", "502", "503", "504", "reset", "truncated", "malformed", "html500")


@dataclass
class Stats:
    attempts: Counter = field(default_factory=Counter)  # body digest -> attempts
    successes: Counter = field(default_factory=Counter)  # body digest -> 200 answers with JSON
    statuses: Counter = field(default_factory=Counter)  # status (or fault name) -> count
    in_flight: int = 0
    max_in_flight: int = 0
    connections: int = 0  # open now: 0 once every client hung up and all it sent was handled
    times: list = field(default_factory=list)  # arrival time of every request
    first_success: float | None = None
    last_success: float | None = None

    @property
    def requests(self) -> int:
        return sum(self.attempts.values())


def answer(body: dict) -> dict:
    """A valid generateContent answer that echoes the last text part."""
    texts = [p.get("text", "") for c in body.get("contents", []) for p in c.get("parts", []) if "text" in p]
    text = f"answer to: {texts[-1] if texts else ''}"
    tokens = max(1, len(json.dumps(body)) // 4)
    return {
        "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {
            "promptTokenCount": tokens,
            "candidatesTokenCount": len(text) // 4 + 1,
            "totalTokenCount": tokens + len(text) // 4 + 1,
        },
        "modelVersion": "fault-server",
    }


class FaultServer:
    """Start with `start()`, stop with `stop()`; knobs may be changed between runs.

    ``fault_rate``: share of attempts that fail with a fault drawn from ``faults``.
    ``fail_first``: additionally, the first K attempts of every body fail.
    ``rpm``: a token-bucket limit (capacity one second of requests); over it, 429 with RetryInfo.
    ``latency``: seconds before each answer. ``require_key``: expected ``x-goog-api-key``.
    ``revoke_after``: after that many 200 answers, every answer is 401 (the key was revoked
    mid-run); decided when answering, so no 200 is written after the first 401.
    ``retry_delay`` (e.g. "1.5s"): injected 429s carry Google's RetryInfo with this delay (as a
    shared quota or an overload does) instead of a ``Retry-After`` header.
    ``hold_after``: requests after the first N are held (unanswered) until `release()`: a test
    can act while answers are surely still to come, with no latency to guess on a loaded machine.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        fault_rate: float = 0.0,
        faults=FAULTS,
        fail_first: int = 0,
        rpm: float | None = None,
        latency: float = 0.0,
        retry_after: str = "0",
        require_key: str | None = None,
        revoke_after: int | None = None,
        retry_delay: str | None = None,
        hold_after: int | None = None,
    ) -> None:
        self.seed, self.fault_rate, self.faults, self.fail_first = seed, fault_rate, tuple(faults), fail_first
        self.rpm, self.latency, self.retry_after, self.require_key = rpm, latency, retry_after, require_key
        self.revoke_after = revoke_after
        self.retry_delay = retry_delay
        self.hold_after = hold_after
        self._released: asyncio.Event | None = None  # made on the server's loop (start)
        self.stats = Stats()
        self.seen_headers: list[dict[str, str]] = []
        self._bucket = (rpm / 60.0) if rpm else 0.0
        self._bucket_at = time.monotonic()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> FaultServer:
        ready = threading.Event()

        async def boot() -> None:
            self._released = asyncio.Event()
            self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()

        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(boot(), self._loop)
        assert ready.wait(60), "the fault server did not start"  # not port 0: a clear failure
        return self

    def release(self) -> None:
        """Answer the held requests (and every later one) at once."""
        assert self._released is not None
        self._loop.call_soon_threadsafe(self._released.set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stop listening and end every connection (requests still in their latency included),
        then close the loop: a connection left pending would be closed at interpreter exit, on
        a closed loop, with a "RuntimeError: Event loop is closed" trace per connection."""

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            connections = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in connections:
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(60)
        self._loop.close()

    # -- decisions ---------------------------------------------------------------------------
    def _fault(self, digest: str, attempt: int) -> str | None:
        if attempt <= self.fail_first:
            return self.faults[(attempt - 1) % len(self.faults)]
        rng = random.Random(f"{self.seed}:{digest}:{attempt}")
        if rng.random() < self.fault_rate:
            return rng.choice(self.faults)
        return None

    def _throttled(self) -> bool:
        if not self.rpm:
            return False
        now = time.monotonic()
        rate = self.rpm / 60.0
        self._bucket = min(rate, self._bucket + (now - self._bucket_at) * rate)  # capacity: 1 s
        self._bucket_at = now
        if self._bucket >= 1.0:
            self._bucket -= 1.0
            return False
        return True

    # -- HTTP/1.1 ----------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if not await self._respond(headers, body, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:  # stop(): end quietly (3.11's start_server logs a
            pass  # cancelled connection task as an unhandled exception)
        finally:
            self.stats.connections -= 1
            writer.close()

    async def _respond(self, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must end (a reset or cut body)."""
        self.seen_headers.append(headers)
        digest = hashlib.sha256(body).hexdigest()
        stats = self.stats
        stats.attempts[digest] += 1
        stats.times.append(time.monotonic())
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            if self.hold_after is not None and stats.requests > self.hold_after:
                assert self._released is not None
                await self._released.wait()
            if self.latency:
                await asyncio.sleep(self.latency)
            if self.require_key is not None and headers.get("x-goog-api-key") != self.require_key:
                stats.statuses["400"] += 1
                self._send(
                    writer,
                    400,
                    {
                        "error": {
                            "code": 400,
                            "message": "API key not valid. Please pass a valid API key.",
                            "status": "INVALID_ARGUMENT",
                            "details": [
                                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
                            ],
                        }
                    },
                )
                return True
            if self.revoke_after is not None and stats.statuses["200"] >= self.revoke_after:
                stats.statuses["401"] += 1
                self._send(
                    writer,
                    401,
                    {
                        "error": {
                            "code": 401,
                            "message": "API key expired. Please renew the API key.",
                            "status": "UNAUTHENTICATED",
                        }
                    },
                )
                return True
            if self._throttled():
                stats.statuses["429"] += 1
                self._send(
                    writer,
                    429,
                    {
                        "error": {
                            "code": 429,
                            "message": "Resource has been exhausted (e.g. check quota).",
                            "status": "RESOURCE_EXHAUSTED",
                            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.05s"}],
                        }
                    },
                )
                return True
            fault = self._fault(digest, stats.attempts[digest])
            if fault is not None:
                stats.statuses[fault] += 1
                return self._misbehave(fault, writer)
            stats.statuses["200"] += 1
            stats.successes[digest] += 1
            stats.last_success = time.monotonic()
            stats.first_success = stats.first_success or stats.last_success
            self._send(writer, 200, answer(json.loads(body)))
            return True
        finally:
            stats.in_flight -= 1

    def _misbehave(self, fault: str, writer: asyncio.StreamWriter) -> bool:
        if fault == "reset":
            writer.transport.abort()
            return False
        if fault == "truncated":
            writer.write(
                b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{"candidates": ['
            )
            writer.transport.close()
            return False
        if fault == "malformed":
            self._send_raw(writer, 200, b"<html><body>upstream hiccup</body></html>", "text/html")
            return True
        if fault == "html500":
            self._send_raw(writer, 500, b"<html><body>Internal Server Error</body></html>", "text/html")
            return True
        code = int(fault)
        status = {
            429: "RESOURCE_EXHAUSTED",
            500: "INTERNAL",
            502: "BAD_GATEWAY",
            503: "UNAVAILABLE",
            504: "DEADLINE_EXCEEDED",
        }[code]
        extra = {"retry-after": self.retry_after} if code in (429, 503) else {}
        error = {"code": code, "message": f"injected {code}", "status": status}
        if code == 429 and self.retry_delay is not None:
            extra, error["details"] = (
                {},
                [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": self.retry_delay}],
            )
        self._send(writer, code, {"error": error}, extra)
        return True

    def _send(
        self, writer: asyncio.StreamWriter, code: int, payload: dict, extra: dict[str, str] | None = None
    ) -> None:
        self._send_raw(writer, code, json.dumps(payload).encode(), "application/json", extra)

    @staticmethod
    def _send_raw(
        writer: asyncio.StreamWriter, code: int, data: bytes, ctype: str, extra: dict[str, str] | None = None
    ) -> None:
        head = [f"HTTP/1.1 {code} X", f"content-type: {ctype}", f"content-length: {len(data)}"]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
