"""The adaptive limiter's judgement, over many seeds, in virtual time (`limiter_sim`): what the
loopback tests in test_faults.py show once on a real socket, these show for 20-40 runs each,
the same on any machine however loaded."""

import statistics

import pytest

from .limiter_sim import simulate

SEEDS = range(12)


def _walls(monkeypatch, **scenario):
    adaptive = [simulate(**scenario, seed=s, monkeypatch=monkeypatch) for s in SEEDS]
    fixed = [simulate(**scenario, seed=s, adaptive=False, monkeypatch=monkeypatch) for s in SEEDS]
    return adaptive, statistics.median(r.wall for r in adaptive) / statistics.median(r.wall for r in fixed)


@pytest.mark.parametrize("stall", [0.0, 0.02])
def test_a_small_random_share_of_429s_does_not_ratchet_the_rate_down(monkeypatch, stall):
    # 3% of attempts answered 429 whatever the rate: right at the share that trips a cut. Each
    # cut's trial used to see 0 or 1 of its next 30 answers throttled (what 3% gives most of
    # the time), call that a cure and keep the cut: 18 cuts and none undone, a median job
    # ~15x slower than the same client with adaptive=False.
    runs, ratio = _walls(monkeypatch, rows=2000, random_429=0.03, latency=0.05, concurrency=64, stall=stall)
    print(f"3% random 429s: {ratio:.2f}x the fixed-rate client's median wall; cuts {[r.limiter.cuts for r in runs]}")
    assert ratio <= 1.5
    assert sum(r.limiter.rate is None for r in runs) >= 0.9 * len(runs)  # nearly every job ends unthrottled


def test_a_large_random_share_of_429s_does_not_slow_the_job(monkeypatch):
    # The case: 20% at random with a retryDelay of 1.5 s, 500 rows at C=64; its goal:
    # within 1.2x of the same client with adaptive=False (it was 13-15x).
    runs, ratio = _walls(monkeypatch, rows=500, random_429=0.2, retry_delay=1.5, latency=0.2, concurrency=64)
    print(f"20% random 429s: {ratio:.2f}x the fixed-rate client's median wall")
    assert ratio <= 1.2


@pytest.mark.parametrize("stall", [0.0, 0.02])
@pytest.mark.parametrize("rpm, rows, concurrency", [(600, 600, 16), (1200, 420, 16), (6000, 2000, 64)])
def test_a_cold_start_finds_a_real_limit_with_few_429s(monkeypatch, rpm, rows, concurrency, stall):
    # The server allows rpm/60 requests a second with one second of allowance, the client is
    # not told. Counted from the first request: >= 90% of the limit, <= 5% of attempts 429. A
    # starved client (stall) bunches answers and sends; the median still holds, and no run
    # drifts far (an undone cure at a limit would run at the full window, 429s by the hundred).
    runs = [
        simulate(rows, rpm=rpm, latency=0.2, concurrency=concurrency, stall=stall, seed=s, monkeypatch=monkeypatch)
        for s in SEEDS
    ]
    shares = sorted(r.share_429 for r in runs)
    print(f"limit {rpm}/min: 429 shares {[f'{x:.1%}' for x in shares]}")
    assert statistics.median(shares) <= 0.05 and statistics.median(r.throughput for r in runs) >= 0.9
    if not stall:
        assert shares[-1] <= 0.05 and min(r.throughput for r in runs) >= 0.9
    assert shares[-1] <= 0.15


@pytest.mark.xfail(strict=True, reason="known gap: fast 429s bias the recent share (see the test)")
def test_a_limit_that_answers_429_at_once_is_still_met(monkeypatch):
    # Gemini answers a 429 at once and a success after generating it; the fault server (and the
    # tests above) answer both after the same latency. With 429s back in 20 ms and successes in
    # 200 ms, the latest sends look nearly all 429s (their successes still on the way), so every
    # probe past the limit cuts too deep: 8 cuts, none undone, 67% of a 6,000/min limit.
    # Holding a fast 429 until its successes would be back restores 100% but costs 8-23% 429s
    # (the cut comes later); the fix wants both. Strict: when it passes, drop the mark.
    runs = [
        simulate(2000, rpm=6000, latency=0.2, concurrency=64, throttle_latency=0.02, seed=s, monkeypatch=monkeypatch)
        for s in range(4)
    ]
    assert min(r.throughput for r in runs) >= 0.9 and max(r.share_429 for r in runs) <= 0.05
