"""The adaptive limiter against simulated servers, in virtual time: no sockets, no sleeps, no
wall clock, so a run is the same on an idle laptop and a loaded CI machine, and one second of
server time costs microseconds. The client side mirrors the executor's loop around one attempt
(`Executor._send`): the slow-start window, the limiter's pacing, a 429 reported to the limiter
and retried after its retryDelay or a jittered back-off. The server is the fault server's token
bucket (``rpm``, one second of allowance) and/or a share of 429s at random whatever the rate.
``throttle_latency``: 429s are decided on arrival and answered after that many seconds (Gemini
answers a 429 at once, not after generating), instead of after ``latency`` as the fault server
does. ``stall``: the client's event loop freezes now and then (for ``stall`` seconds on average,
every 0.3 s on average), as a process starved of CPU does, bunching its answers and sends."""

from __future__ import annotations

import asyncio
import random
import selectors
from dataclasses import dataclass
from types import SimpleNamespace

import gemframe._core.limits as limits


class _Clock:
    now = 1000.0


class _Selector(selectors.SelectSelector):
    """Nothing is ever ready; waiting for the next timer moves the clock to it at once."""

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout=None):
        if timeout is None:
            raise RuntimeError("the simulation is stuck: nothing scheduled")
        self.clock.now += max(timeout, 0.0)
        return []


class _VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: _Clock) -> None:
        super().__init__(_Selector(clock))
        self.clock = clock

    def time(self) -> float:
        return self.clock.now


@dataclass
class Result:
    wall: float  # virtual seconds from the first send to the last answer
    attempts: int  # counted at the server
    throttled: int  # of those, answered 429
    throughput: float | None  # rows per second over the limit's rate, from the first attempt
    limiter: limits.AdaptiveRate | None

    @property
    def share_429(self) -> float:
        return self.throttled / self.attempts


def simulate(
    rows: int,
    *,
    rpm: float | None = None,
    random_429: float = 0.0,
    retry_delay: float | None = None,
    latency: float = 0.2,
    concurrency: int = 16,
    backoff: float = 0.5,
    adaptive: bool = True,
    stall: float = 0.0,
    throttle_latency: float | None = None,
    seed: int = 0,
    monkeypatch=None,
) -> Result:
    """Send ``rows`` requests, each until answered; returns what the server counted."""
    clock, rng = _Clock(), random.Random(seed)
    # The limiter's clock is virtual too (its module's, not the process's: other threads keep theirs).
    monkeypatch.setattr(limits, "time", SimpleNamespace(monotonic=lambda: clock.now))
    loop = _VirtualLoop(clock)
    counts = {"attempts": 0, "throttled": 0, "first": None, "last": None}
    bucket = [rpm / 60.0 if rpm else 0.0, clock.now]  # starts full: one second of allowance
    frozen_until = [0.0]

    def over_the_limit() -> bool:
        if not rpm:
            return False
        rate = rpm / 60.0
        bucket[0] = min(rate, bucket[0] + (clock.now - bucket[1]) * rate)
        bucket[1] = clock.now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return False
        return True

    async def server() -> tuple[int, float | None]:
        counts["attempts"] += 1
        counts["first"] = counts["first"] or clock.now
        if throttle_latency is not None:  # decided on arrival, a 429 answered at once (as Gemini does)
            throttled = over_the_limit() or rng.random() < random_429
            await asyncio.sleep(throttle_latency if throttled else latency)
            if throttled:
                counts["throttled"] += 1
                return 429, 0.05
            counts["last"] = clock.now
            return 200, None
        await asyncio.sleep(latency * (1 + (0.5 * rng.random() if stall else 0.0)))
        if over_the_limit():
            counts["throttled"] += 1
            return 429, 0.05  # the fault server's RetryInfo for its limit
        if rng.random() < random_429:
            counts["throttled"] += 1
            return 429, retry_delay
        counts["last"] = clock.now
        return 200, None

    async def starved() -> None:  # wait out a freeze of the whole loop
        if clock.now < frozen_until[0]:
            await asyncio.sleep(frozen_until[0] - clock.now)

    async def freezes() -> None:
        while True:
            await asyncio.sleep(rng.expovariate(1 / 0.3))
            frozen_until[0] = clock.now + rng.expovariate(1 / stall)

    limiter = limits.RateLimiter(adaptive=adaptive)
    window = limits.Window(concurrency)

    async def row() -> None:
        attempt = 0
        while True:
            attempt += 1
            async with window:
                await limiter.acquire(0)
                await starved()
                sent = clock.now
                status, retry_after = await server()
                await starved()
            if status == 200:
                window.grow()
                limiter.on_answer(sent, 0, None)
                return
            limiter.on_throttle(sent)
            if retry_after is not None:
                await asyncio.sleep(retry_after + rng.uniform(0, backoff))
            else:
                await asyncio.sleep(rng.uniform(0, min(30.0, backoff * 2 ** (attempt - 1))))

    async def job() -> float:
        start = clock.now
        freezer = asyncio.ensure_future(freezes()) if stall else None
        await asyncio.gather(*(row() for _ in range(rows)))
        if freezer is not None:
            freezer.cancel()
        return clock.now - start

    try:
        wall = loop.run_until_complete(job())
    finally:
        loop.close()
    throughput = rows / (counts["last"] - counts["first"]) * 60 / rpm if rpm else None
    return Result(wall, counts["attempts"], counts["throttled"], throughput, limiter.adaptive)
