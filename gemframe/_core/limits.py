"""Rate limits: fixed requests/tokens per minute, a slow-start window of requests in flight, and
an adaptive send rate that settles just under a server's real limit without being told it.

**Slow start** (`Window`). A cold job sends one request first and lets one more in flight per
success (so the window doubles per round trip, like TCP's slow start) up to the concurrency. A
wrong key, model or URL then stops the job after one request instead of a whole window, and a
server that allows 10 requests/s is not met with a burst of 64. It costs log2(concurrency)
round trips once per job (6 at C=64: ~1.2 s at 200 ms latency, noise on a job of thousands of
requests). "A job" is a busy period of the executor: the window starts again at one after the
executor has been idle for `IDLE_RESTART` seconds. Not per `Client.send`: polars' streaming
engine calls it once per small batch, often from several threads at once, and each call would
pay the ramp again; a notebook cell run minutes later is a new job (maybe another model, maybe
a key revoked since), so it starts cautiously again.

**Adaptive rate** (`AdaptiveRate`): AIMD on the send rate, not on concurrency (at 20 requests/s
and 50 ms latency the right concurrency is "one, sometimes"). When 429s become a real share of
the answers to requests sent at the current rate, the rate drops to a fraction of what the
server actually accepted (multiplicative decrease); then it rises again (1% of that level per
second, accelerating with time since the cut) until the next cut. With no throttling it never
limits anything. Each probe past a limit costs about two 429s (the fewest that trip a cut), so
the slope sets the steady 429 share: at 10 requests/s, 2% per second probed every ~12 s (1.7% of
attempts answered 429), 1% every ~18 s; the acceleration still recovers an undershoot (or a
limit that was raised) in seconds.

Gemini also answers 429 when slowing down cannot help: a project quota shared with other jobs,
a momentary overload. Cutting for those only makes the job slow, and each cut is followed by
the same share of 429s, so the rate would ratchet down to nothing. So every cut is a trial: the
429 share of the answers to requests sent at the new rate is compared with the share that
triggered the cut (a two-proportion test, so noise on a few dozen answers decides nothing):

- clearly lower (an exact test when 429s are few: `_fewer_by_chance`), or down to the background
  level after a share that had risen with the rate (below): the cut was the cure; keep it;
- about the same: slowing down was not the cure; undo the cut (back to the rate before it,
  usually "no limit") and remember that share as the background (`floor`): later cuts need a
  share clearly above it, i.e. a share that rises with the rate, which is what a real limit does;
- clearly higher, or "same" at half or more: still far too fast (a cold start spent the
  server's burst allowance, so the first measure of what it accepts was inflated; far above a
  limit every rate draws nearly all 429s, so the share cannot tell); cut again, same trial.

A small share is where this is hard: at 3% of 1,000 answers per second, two 429s among a few
dozen answers (enough for a cut) come every few dozen milliseconds, and 0 or 1 of the next 30
is what 3% gives most of the time, so "down to the background" kept every such cut and the rate
ratcheted down 14x. So the share before the cut is that of a sample stopped at the 429 that
tripped it, (k-1)/(n-1); "lower" needs a test valid for a handful of 429s; and a share that
merely drops to the background keeps the cut only if it had *risen with the rate* before it: the
window that tripped the cut clearly (3 sigma) above the earlier answers at the same rate (which
rises with time since it was set: `_rose`). A limit does that: 2 of the last 10 after 110 clean
answers. Random 429s do not: the window is within noise of the rest, or there is no rest (the
cut came moments after the last). Without that, the trial waits while fewer than two 429s come
(until none would be clearly lower), and is "same" once they do, unless they came only after a
long clean run (the rising rate met the limit again: the cut was the cure). tests/test_limits.py
judges all this over many seeds in virtual time, the same on any machine however loaded.

An undo is a trial too. A limit with a burst allowance can let a trial's first answers through
on what it saved up while the rate was low, so a real cure can look like "same". Going back up
then draws a share that rises with the rate (`_rose_after_undo`): clearly above the trial's, or
a recent window clearly above the first answers after the undo. That shows the limit: cut
again, for good (that trial is never undone), and forget the background learned from it.

**A cold start** meets a limit's burst allowance (a token bucket: R per second, with a second or
more of R saved up). It lets slow start double past the limit for a round trip or two; then a
whole round is answered 429 at once (sent before any answer could tell: 14 of 16 at 10/s with
1 s of burst, C=16). What was being sent then (~60/s) says nothing about the limit. So a cut
from "no limit" that follows a run of successes (``burst_run``: 15 without a 429) starts from
what the server accepted per second by the clock over the recent answers: the limit plus the
allowance spread over the ramp, too high but within about 2x. Past its allowance a server
accepts exactly its limit however fast we send, so the first 429s at that rate cut once more,
to what was accepted since the cut. Against 10 requests/s that costs two 429s; the cut from
what was being sent cost twelve. The second cut stays in the same trial and proves nothing
(random 429s would take the same path), so the trial can still undo both. Random 429s rarely
come after such a run (at a 20% share, one job in 30); without one the cut starts from what
was being sent, which a trial undoes sooner (a deeper cut is slower to judge).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque

logger = logging.getLogger("gemframe")


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


IDLE_RESTART = 5.0  # seconds with nothing in flight after which a window starts at one again


class Window:
    """How many requests may be in flight: slow start (module docstring) up to ``limit``.

    Used as ``async with window:`` around one attempt; `grow` after a success. Growing releases
    one more permit of an ordinary semaphore, so a request costs what a semaphore costs.
    """

    def __init__(self, limit: int, idle_restart: float = IDLE_RESTART) -> None:
        self.limit = limit
        self.idle_restart = idle_restart
        self.size = 1
        self.busy = 0
        self._idle_since = time.monotonic()
        self._slots = asyncio.Semaphore(1)

    def grow(self) -> None:
        """One success: one more request may be in flight (until the limit)."""
        if self.size < self.limit:
            self.size += 1
            self._slots.release()

    async def __aenter__(self) -> None:
        if self.busy == 0 and self.size > 1 and time.monotonic() - self._idle_since > self.idle_restart:
            # A new job: nobody holds a permit, so nobody waits on the old semaphore.
            self.size, self._slots = 1, asyncio.Semaphore(1)
        self.busy += 1  # counted before waiting: a request queued here means the job goes on
        await self._slots.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._slots.release()
        self.busy -= 1
        if self.busy == 0:
            self._idle_since = time.monotonic()


class AdaptiveRate:
    """The AIMD send-rate controller described in the module docstring.

    It judges the current rate only by answers to requests sent since the rate was last set
    (its epoch). A cut needs two 429s or more, and more than ``threshold`` plus the background
    share (``floor``, with a noise margin), among at least ``min_answers`` answers of the last
    ``window`` seconds of sending: a stray 429 from a flaky server must not collapse a healthy
    job's rate. A cut is judged on the answers at the new rate (`_verdict`).
    """

    def __init__(
        self,
        decrease: float = 0.85,
        increase: float = 0.01,
        acceleration: float = 0.001,
        threshold: float = 0.03,
        min_answers: int = 10,
        judge_answers: int = 30,
        window: float = 1.0,
        min_rate: float = 0.2,
        burst_run: int = 15,
    ) -> None:
        self.decrease = decrease  # new rate = decrease x accepted rate
        self.increase = increase  # per second, as a fraction of the level set at the last cut
        self.acceleration = acceleration  # per second squared, likewise
        self.threshold = threshold
        self.min_answers = min_answers
        self.judge_answers = judge_answers
        self.window = window
        self.min_rate = min_rate
        self.burst_run = burst_run  # successes in a row before the 429s that show a burst allowance spent
        self.rate: float | None = None  # None: not limiting (no capacity signal yet, or undone)
        self.floor = 0.0  # share of 429s that slowing down did not cure
        self._learning = False  # measuring the floor (since an undo)
        self.throttles = self.cuts = self.undone = 0
        self._base = 0.0
        self._epoch: float | None = None  # when the current rate was set (or the first send)
        self._answers: deque[tuple[float, bool]] = deque()  # (sent at, throttled) since the epoch, last `window` s
        self._recent_throttled = 0  # 429s among those (kept as they come: this runs per answer)
        self._count = self._throttled = 0  # every answer since the epoch
        # The cut being judged: (rate before its trial began, 429 share at that rate, of how many
        # answers, whether the trial has shown a real limit, whether the share that tripped it had
        # risen with the rate: `_rose`).
        self._trial: tuple[float | None, float, int, bool, bool] | None = None
        self._next_send = 0.0
        self._sends: deque[float] = deque()  # when requests went out, last `window` s
        self._rtt = 0.0  # of the latest answer
        self._trial_start = 0.0
        self._accepted_in_trial = 0  # successes answered since the trial began, whenever sent
        self._cold = False  # the trial is of a cold cut (module docstring): its first measure was inflated
        self._undone = (0, 1, 0.0)  # since the last undo: its trial's 429s and answers, and the floor before it

    def on_success(self, sent_at: float) -> None:
        self._accepted_in_trial += 1
        if self._record(sent_at, False):
            self._decide()

    def on_throttle(self, sent_at: float) -> None:
        self.throttles += 1
        if self._record(sent_at, True):
            self._decide()

    def _record(self, sent_at: float, throttled: bool) -> bool:
        if self._epoch is None or sent_at < self._epoch:
            return False  # sent at an earlier rate: says nothing about this one
        self._rtt = time.monotonic() - sent_at
        self._answers.append((sent_at, throttled))
        self._recent_throttled += throttled
        while self._answers and self._answers[0][0] < sent_at - self.window:
            self._recent_throttled -= self._answers.popleft()[1]
        self._count += 1
        self._throttled += throttled
        return True

    def _over(self) -> bool:
        """Whether 429s are a real share of the recent answers, clearly above the background."""
        n = len(self._answers)
        throttled = self._recent_throttled
        if n < self.min_answers or throttled < 2:  # one 429 is a stray
            return False
        return self._above_floor(throttled / n, n, 3 if self.floor else 0)

    def _decide(self) -> None:
        if self._learning and self._trial is None:
            if self._rose_after_undo():
                # Back at the faster rate the share rose clearly above the trial's: the 429s
                # follow the rate, so the cut was a cure after all (a limit that let the trial's
                # first answers through on its saved-up allowance). Cut again, for good.
                self.floor, self._learning = self._undone[2], False
                self._cut(same_trial=False, proven=True)
                return
            if self._count >= self.judge_answers:
                self.floor = self._throttled / self._count  # the background, measured at the restored rate
        over = self._over()
        verdict = None
        if self._trial is not None:
            if self._cold and self._over():
                # The first cut's measure still held the server's burst allowance, spent now: what
                # it accepted since is its real rate. Cut once more from that, same trial, not yet
                # proof of a limit (random 429s look the same here; the trial tells them apart).
                self._cut(same_trial=True, proven=False)
                return
            verdict = self._verdict()
            over = over or verdict == "higher"
            if verdict == "wait":
                return  # no cut while one is being judged: it would muddle the verdict
            logger.debug(
                "rate %s: 429 share %d/%d after the cut vs %.2f of %d before: %s",
                self.rate and round(self.rate, 1),
                self._throttled,
                self._count,
                self._trial[1],
                self._trial[2],
                verdict,
            )
            if verdict == "same" and (self._trial[3] or self._throttled >= 0.5 * self._count):
                # A limit (see _cut), or half or more answered 429 at this rate: far too fast
                # (module docstring), never a background to learn. Not yet cut enough.
                verdict = "higher"
            elif verdict == "same":  # slowing down did not lower the share: not the cure
                self._undo()
                return
            if verdict == "lower":
                self._trial = None
                self.floor = min(self.floor, self._throttled / self._count)
        if over:
            self._cut(same_trial=verdict == "higher")

    def _verdict(self) -> str:
        """The cut under trial against the 429 share at its rate: "lower", "same", "higher", or
        "wait" (too few answers yet). Clear differences (3 sigma) are acted on from
        ``min_answers`` answers, and so is a share clearly above the background ("same"); at
        ``judge_answers`` 2 sigma decide; a share not above the background is "lower" only after a
        share that rose with the rate (module docstring)."""
        assert self._trial is not None
        _, before, n1, _, rose = self._trial
        n2 = self._count
        if n2 < self.min_answers:
            # Far above a limit (the cold start's first cut was too shallow): cut again at once.
            return "higher" if n2 >= self.min_answers // 2 and self._throttled >= 0.8 * n2 else "wait"
        early = n2 < self.judge_answers
        sigmas = 3 if early else 2
        after = self._throttled / n2
        noise = _noise(before * n1, n1, self._throttled, n2, sigmas)
        if after > before + noise:
            return "higher"
        t1 = round(before * n1)
        if after < before - noise and _fewer_by_chance(t1, n1, self._throttled, n2) < (0.00135 if early else 0.023):
            return "lower"
        if early:  # "same" already if clearly so (it costs a random-429 job its speed), and not rising
            clearly = n2 >= 2 * self.min_answers and self._above_floor(after, n2, 3) and after <= before + noise * 2 / 3
            return "same" if clearly else "wait"
        if self._above_floor(after, n2, 2):
            return "same"
        if rose:  # the share had risen with the rate (a limit): down to the background is the cure
            return "lower"
        # Neither clearly lower than before nor clearly above the background, and nothing showed a
        # limit: at a small share the answers at the new rate cannot yet tell a cure from chance
        # (0 of 30 is what a 3% share gives four times in ten). While none has come since the cut,
        # wait until none at all is clearly lower (`_fewer_by_chance`). 429s that come only after
        # a long clean run at the new rate (which rises with time) rose with it: the cut was a
        # cure until the rate met the limit again. 429s still coming at the new rate from the
        # start, or none either before or after: no cure is shown, "same".
        if t1 and not self._throttled and _fewer_by_chance(t1, n1, 0, n2) >= 0.023:
            return "wait"
        if self._throttled < 2:  # one 429 is a stray: neither a cure nor its absence
            return "wait"
        return "lower" if self._rose(2) else "same"

    def _rose(self, sigmas: float = 3) -> bool:
        """Whether the 429 share of the recent answers (the window that trips a cut) is clearly
        (``sigmas``) above that of the earlier answers at this rate, each of at least
        ``min_answers`` answers and the window holding two 429s or more. The rate rises with time
        since it was set, so this is a share that rose with the rate: a limit. Random 429s keep
        their share whatever the rate; a window picked because it holds a few more is within
        noise of the rest, or there is no rest to compare with (a cut soon after the last)."""
        n1, t1 = len(self._answers), self._recent_throttled
        n0, t0 = self._count - n1, self._throttled - t1
        if n0 < self.min_answers or n1 < self.min_answers or t1 < 2:
            return False
        return t1 / n1 > t0 / n0 + _noise(t0, n0, t1, n1, sigmas)

    def _above_floor(self, share: float, n: int, sigmas: float) -> bool:
        """Whether a 429 share of ``n`` answers is clearly above the background (and the
        threshold): not a stray 429 or two."""
        level = self.floor + self.threshold
        return share > level + sigmas * math.sqrt(level * (1 - level) / n)

    def _cut(self, same_trial: bool, proven: bool | None = None) -> None:
        """Set the rate just under what the server accepted lately (by send time)."""
        answers = self._answers
        throttled = self._recent_throttled
        cold, was_cold = False, self._cold
        # What is really being sent (the pacing rate can be far above it when the window or the
        # caller is the bottleneck: cutting that would change nothing).
        sending = self._send_rate()
        if same_trial:
            # Still far too fast: the few answers at this rate are nearly all 429s and say little.
            # What the server let through since the trial began does: past its allowance it
            # accepts its limit per second, however fast we send.
            accepted = (self._accepted_in_trial + 0.5) / max(time.monotonic() - self._trial_start, 0.05)
        elif self.rate is None and next((i for i, (_, t) in enumerate(answers) if t), 0) >= self.burst_run:
            # A run of successes, then 429s: a burst allowance spent (module docstring). What the
            # server accepted per second by the clock, from the recent answers' first send to now:
            # its limit, still inflated by the burst; the trial's first 429s correct it (`_decide`).
            cold = True
            accepted = (len(answers) - throttled + 0.5) / max(time.monotonic() - answers[0][0], 0.05)
        elif self.rate is None:
            # Not limiting yet, 429s from the start (slow start: the window doubles per round
            # trip, so the answers so far understate the current rate): the share of what is
            # being sent now.
            accepted = (1 - throttled / len(answers)) * sending
        else:
            # Accepted lately: sent per second over the recent answers' send times, times the
            # share accepted, +0.5 (never zero).
            recent = list(answers)[-2 * self.min_answers :]
            sent = [s for s, _ in recent]
            span = max(max(sent) - min(sent), 0.01)
            accepted = (len(recent) - 1) / span * (sum(not t for _, t in recent) + 0.5) / len(recent)
        if not same_trial:
            self._trial_start, self._accepted_in_trial = time.monotonic(), 0
        before = self._trial[0] if same_trial and self._trial is not None else self.rate
        # The share to judge the cut against: of every answer at this rate, not of the recent
        # ones that tripped the cut (picked at a peak, they would make any cut look like a cure).
        # Even so, the cut was made on the 429 that tipped the count: a sample stopped at its
        # k-th 429 estimates the share by (k-1)/(n-1), not k/n (which, when the rate was set
        # moments ago, is the trigger's own peak: 2 of 15 "cured" by 0 of 30 at a 3% share).
        # A trial cut again because the share rose after a cut, or reached half, has shown a
        # real limit (random 429s do neither): it is never undone, only cut further.
        rose = self._rose() or (same_trial and self._trial is not None and self._trial[4])
        proven = same_trial if proven is None else proven
        n = max(self._count - 1, 1)
        self._trial = (before, max(self._throttled - 1, 0) / n, n, proven, rose)
        self._cold = cold
        self.cuts += 1
        self._learning = False
        # A cold trial's second cut measures what the server let through since the first, which
        # still held some of its allowance: a little deeper, or the rate lands just above the
        # limit, where its few 429s look like a random share (about 1 in 30 cold starts under load).
        decrease = self.decrease * (0.94 if same_trial and was_cold else 1.0)
        rate = max(self.min_rate, decrease * min(accepted, sending or accepted))
        logger.debug(
            "429s %d of %d answers: send rate cut from %s to %.1f/s (accepted %.1f/s, sending %.1f/s)",
            throttled,
            len(answers),
            self.rate and round(self.rate, 1),
            rate,
            accepted,
            sending,
        )
        self._set(rate)
        self._next_send += 1.0 / self.rate  # type: ignore[operator]  # what was sent just before spent the server's allowance (mypy cannot see that _set(rate) made self.rate a float)

    def _sent(self, now: float) -> None:
        self._sends.append(now)
        while self._sends[0] < now - self.window:
            self._sends.popleft()

    def _send_rate(self) -> float:
        """Requests sent per second lately: the most over the last round trip, two, or the
        last ``window`` seconds (sends clocked by answers come in bursts one round trip apart)."""
        sends, now = self._sends, time.monotonic()
        best = len(sends) / self.window
        rtt = max(self._rtt, 0.01)
        for span in (rtt, 2 * rtt):
            if span < self.window:
                count = 0
                for t in reversed(sends):
                    if t < now - span:
                        break
                    count += 1
                best = max(best, count / span)
        return best

    def _rose_after_undo(self) -> bool:
        """Whether the share rose when the rate went back up after an undo (module docstring):
        since the undo clearly above the undone trial's own (an exact test, as likely by chance
        as 3 sigma: two 429s among the first 10 answers can be chance at a 3% share), or the
        recent window clearly above the first answers since the undo (`_rose`). Asked over the
        first 300 answers only: asked for ever, noise would answer yes in the end."""
        t1, n1, _ = self._undone
        t2, n2 = self._throttled, self._count
        if n2 < self.min_answers or t2 < 2 or n2 > 10 * self.judge_answers:
            return False
        return _more_by_chance(t1, n1, t2, n2) < 0.00135 or self._rose()

    def _undo(self) -> None:
        """Back to the rate before the trial; its 429 share is the background from now on."""
        assert self._trial is not None
        before, share, n1, _, _ = self._trial
        self._undone = (self._throttled, max(self._count, 1), self.floor)
        self.floor = (share * n1 + self._throttled) / (n1 + self._count)
        self._trial = None
        self.undone += 1
        self._learning = True  # refine that estimate with the answers at the restored rate
        self._set(before)

    def _set(self, rate: float | None) -> None:
        self.rate = rate
        self._base = rate or 0.0
        self._epoch = self._next_send = time.monotonic()
        self._answers.clear()
        self._recent_throttled = self._count = self._throttled = 0

    async def wait(self) -> None:
        """Pace sends at the current rate, which grows with the time since the last cut:
        slowly at first (probing near the level that was too much), faster later (so an
        undershoot, or a limit that was raised, is recovered from in seconds)."""
        while True:
            now = time.monotonic()
            if self._epoch is None:
                self._epoch = now
            if self.rate is None:
                self._sent(now)
                return
            epoch = self._epoch
            since = now - epoch
            self.rate = self._base * (1.0 + self.increase * since + self.acceleration * since * since)
            send_at = max(now, self._next_send)
            self._next_send = send_at + 1.0 / self.rate
            if send_at <= now:
                self._sent(now)
                return
            await asyncio.sleep(send_at - now)
            if self._epoch == epoch:
                self._sent(time.monotonic())
                return
            # The rate was set again while this request waited: queue again at the new rate.


def _noise(t1: float, n1: int, t2: float, n2: int, sigmas: float) -> float:
    """How far two 429 shares (t1 of n1, t2 of n2) may differ by chance: ``sigmas`` standard
    errors of their difference, were both the pooled share (a two-proportion test)."""
    pooled = (t1 + t2) / (n1 + n2)
    return sigmas * math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))


def _more_by_chance(t1: int, n1: int, t2: int, n2: int) -> float:
    """The chance that t2 or more of the t1 + t2 429s fall among the n2 answers after a change,
    were the share the same before and after (the other tail of `_fewer_by_chance`)."""
    return 1.0 - _at_most(t2 - 1, t1 + t2, n2 / (n1 + n2)) if t2 else 1.0


def _fewer_by_chance(t1: int, n1: int, t2: int, n2: int) -> float:
    """The chance that t2 or fewer of the t1 + t2 429s fall among the n2 answers after a cut,
    were the share the same before and after: each falls after it with chance n2 / (n1 + n2).
    Exact, where a normal approximation is not: with one 429 before the cut (2 of 15, the
    second one tripping it, so 1 of 14), none in the next 56 reads as 2 sigma lower, while that
    one 429 simply fell among the first 14 of 70 answers: a chance of 1 in 5."""
    return _at_most(t2, t1 + t2, n2 / (n1 + n2))


def _at_most(x: int, k: int, q: float) -> float:
    """P(X <= x) for X binomial(k, q), 0 < q < 1; its terms in logarithms, so that a long run of
    429s (k past ~1,000) cannot overflow a float."""
    log_q, log_p = math.log(q), math.log1p(-q)
    return sum(
        math.exp(math.lgamma(k + 1) - math.lgamma(i + 1) - math.lgamma(k - i + 1) + i * log_q + (k - i) * log_p)
        for i in range(min(x, k) + 1)
    )


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
