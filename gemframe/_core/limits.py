"""Rate limits: fixed requests/tokens per minute, and an adaptive send rate that settles just
under a server's real limit without being told it.

The adaptive part is AIMD on the send rate (not on concurrency: at 20 requests/s and 50 ms
latency the right concurrency is "one, sometimes"). When 429s become a real share of answers,
the rate drops to a fraction of what the server actually accepted (multiplicative decrease);
then it rises again (additive increase of a few percent of that level per second, accelerating
with time since the cut) until the next cut. With no throttling it never limits anything.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class TokenBucket:
    """``rate`` units per second, at most ``capacity`` saved up; waits are async."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self.stamp = time.monotonic()

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def take(self, amount: float) -> None:
        """Wait until ``amount`` is available (a request bigger than the bucket waits for a full one)."""
        amount = min(amount, self.capacity)
        while True:
            now = time.monotonic()
            self._refill(now)
            if self.level >= amount:
                self.level -= amount
                return
            await asyncio.sleep((amount - self.level) / self.rate)

    def give_back(self, amount: float) -> None:
        """Correct an estimate: positive returns units, negative takes more (may go below 0)."""
        self._refill(time.monotonic())
        self.level = min(self.capacity, self.level + amount)


class AdaptiveRate:
    """The AIMD send-rate controller described in the module docstring.

    It judges the current rate only by answers to requests sent since the rate was last set,
    over the last ``window`` seconds of sending. A 429 signals capacity only when 429s are more
    than ``threshold`` of at least ``min_answers`` such answers: a stray 429 from a flaky server
    must not collapse a healthy job's rate.
    """

    def __init__(
        self,
        decrease: float = 0.85,
        increase: float = 0.03,
        acceleration: float = 0.002,
        threshold: float = 0.03,
        min_answers: int = 10,
        window: float = 1.0,
        min_rate: float = 0.2,
    ) -> None:
        self.decrease = decrease  # new rate = decrease x accepted rate
        self.increase = increase  # per second, as a fraction of the level set at the last cut
        self.acceleration = acceleration  # per second squared, likewise
        self.threshold = threshold
        self.min_answers = min_answers
        self.window = window
        self.min_rate = min_rate
        self.rate: float | None = None  # None: not limiting (no capacity signal yet)
        self.throttles = 0
        self._base = 0.0
        self._epoch: float | None = None  # when the current rate was set (or the first send)
        self._answers: deque[tuple[float, bool]] = deque()  # (sent at, throttled) since the epoch
        self._next_send = 0.0

    def on_success(self, sent_at: float) -> None:
        self._record(sent_at, False)

    def on_throttle(self, sent_at: float) -> None:
        """A 429: if 429s are now a real share of answers, set the rate just under what the
        server accepted lately."""
        self.throttles += 1
        self._record(sent_at, True)
        answers = self._answers
        throttled = sum(t for _, t in answers)
        if len(answers) < self.min_answers or throttled <= self.threshold * len(answers):
            return
        assert self._epoch is not None
        span = max(min(self.window, max(s for s, _ in answers) - self._epoch), 0.01)
        accepted = (len(answers) - throttled + 1) / span  # +1: a few answers must not read as zero
        self.rate = max(self.min_rate, self.decrease * min(accepted, self.rate or accepted))
        self._base = self.rate
        self._epoch = self._next_send = time.monotonic()
        answers.clear()

    def _record(self, sent_at: float, throttled: bool) -> None:
        if self._epoch is None or sent_at < self._epoch:
            return  # sent at an earlier rate: says nothing about this one
        self._answers.append((sent_at, throttled))
        while self._answers and self._answers[0][0] < sent_at - self.window:
            self._answers.popleft()

    async def wait(self) -> None:
        """Pace sends at the current rate, which grows with the time since the last cut:
        slowly at first (probing near the level that was too much), faster later (so an
        undershoot, or a limit that was raised, is recovered from in seconds)."""
        while True:
            now = time.monotonic()
            if self._epoch is None:
                self._epoch = now
            if self.rate is None:
                return
            epoch = self._epoch
            since = now - epoch
            self.rate = self._base * (1.0 + self.increase * since + self.acceleration * since * since)
            send_at = max(now, self._next_send)
            self._next_send = send_at + 1.0 / self.rate
            if send_at <= now:
                return
            await asyncio.sleep(send_at - now)
            if self._epoch == epoch:
                return
            # The rate was cut while this request waited: queue again at the new rate.


class RateLimiter:
    """Everything that paces sends for one executor: fixed RPM/TPM and the adaptive rate."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None, adaptive: bool = True) -> None:
        if (rpm is not None and rpm <= 0) or (tpm is not None and tpm <= 0):
            raise ValueError("rpm and tpm must be positive")
        self.requests = TokenBucket(rpm / 60.0, 1.0) if rpm else None  # evenly paced, no bursts
        self.tokens = TokenBucket(tpm / 60.0, tpm / 6.0) if tpm else None  # bursts of 10 s worth
        self.adaptive = AdaptiveRate() if adaptive else None

    async def acquire(self, estimated_tokens: int) -> None:
        if self.adaptive is not None:
            await self.adaptive.wait()
        if self.requests is not None:
            await self.requests.take(1)
        if self.tokens is not None:
            await self.tokens.take(estimated_tokens)

    def on_answer(self, sent_at: float, estimated_tokens: int, used_tokens: int | None) -> None:
        if self.adaptive is not None:
            self.adaptive.on_success(sent_at)
        if self.tokens is not None and used_tokens is not None:
            self.tokens.give_back(estimated_tokens - used_tokens)

    def on_throttle(self, sent_at: float) -> None:
        if self.adaptive is not None:
            self.adaptive.on_throttle(sent_at)


def estimate_tokens(content: bytes) -> int:
    """A cheap pre-call token estimate: ~4 bytes of request JSON per token, plus Gemini's flat
    258 tokens per inline image (whose base64 bytes are skipped, not counted)."""
    marker = b'"data":"'
    skipped = images = start = 0
    while (i := content.find(marker, start)) != -1:
        begin = i + len(marker)
        start = content.find(b'"', begin) + 1 or len(content)
        skipped += start - begin
        images += 1
    return max(1, (len(content) - skipped) // 4) + 258 * images
