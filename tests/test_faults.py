"""Real-world faults: flaky servers, rate limits, Ctrl-C, bad input, secrets. Counted at the
(misbehaving, loopback-only) server, never trusted from the client."""

import asyncio
import json
import logging
import os
import signal
import threading
import time

import polars as pl
import pytest

import gemframe as gf
from gemframe._pipeline import read_manifest, run
from gemframe.emulator import Emulator

from .conftest import gemframe_cli, gemframe_command, gemframe_run_args, wait_for

KEY = "sk-live-DO-NOT-LEAK-1234567890abcdef"


def _client(server, cache_dir, **options):
    options = {"concurrency": 32, "backoff": 0.02, "timeout": 5, "progress": False, **options}
    return gf.Client(
        "google", api_key=options.pop("api_key", KEY), base_url=server.url, cache_dir=str(cache_dir), **options
    )


def _ask(client, n, prefix="row"):
    frame = pl.DataFrame({"prompt": [f"{prefix} {i}" for i in range(n)]})
    return frame.with_columns(reply=gf.generate("prompt", client=client)).unnest("reply")


def test_fault_matrix_loses_nothing_and_pays_once(fault_server, cache_dir):
    # 25% of attempts fail, in every way a server can. Faults are a pure function of (seed, body,
    # attempt): with seed 8, rows 156 and 163 fail 5 attempts in a row (0.25**5, about 1 in 1,000
    # rows), which a fixed cap of 5 attempts turned into lost rows. Retried until the deadline
    # (the default), every row is answered.
    rows = 1000
    server = fault_server(seed=8, fault_rate=0.25)
    with _client(server, cache_dir) as client:  # default max_attempts and deadline
        out = _ask(client, rows)
    stats = server.stats
    assert out.filter(pl.col("error").is_not_null())["prompt"].to_list() == []
    assert out["text"].to_list() == [f"answer to: row {i}" for i in range(rows)]  # no mix-ups
    assert len(stats.successes) == rows and max(stats.successes.values()) == 1  # nobody paid twice
    faults = stats.requests - rows
    assert faults > 250 and len({k for k in stats.statuses if k != "200"}) == 9  # every fault kind seen
    assert out["attempts"].sum() == stats.requests and out["attempts"].max() >= 6
    print(
        f"fault matrix: {rows} rows answered, {faults} faults retried, most attempts {out['attempts'].max()}, "
        f"duplicates 0, statuses {dict(stats.statuses)}"
    )


def test_retry_after_is_honoured(cache_dir):
    slow_down = Emulator(fail_first=1, fail_status=503, retry_after=1)
    with gf.Client(
        gf.EmulatorProvider(app=slow_down), cache_dir=str(cache_dir), backoff=0.01, progress=False
    ) as client:
        out = _ask(client, 2)
    assert out["attempts"].to_list() == [2, 2] and out["error"].is_null().all()
    assert (out["latency_ms"] >= 1000).all()  # waited as told, not its own 10 ms back-off


def test_client_errors_are_not_retried(fault_server, cache_dir):
    server = fault_server(require_key="another key")
    with _client(server, cache_dir, concurrency=16) as client, pytest.raises(gf.AuthenticationError):
        _ask(client, 100)
    assert server.stats.requests == 1  # slow start: a cold job sends one request first, not a window of 16
    with gf.Client(gf.EmulatorProvider(app=Emulator()), cache_dir=str(cache_dir), progress=False) as client:
        out = (
            pl.DataFrame({"prompt": ["[emulator:status=400] bad"]})
            .with_columns(reply=gf.generate("prompt", client=client))
            .unnest("reply")
        )
    assert out["attempts"][0] == 1 and out["error"][0]["code"] == 400


def test_attempt_limit_and_deadline(fault_server, cache_dir):
    # Every 503 says Retry-After: 0.1, so every wait is 0.1 s plus jitter in [0, backoff): never
    # shorter. A retry is made only if it fits in the deadline, so within 0.5 s a row sleeps at
    # most 0.5 / 0.1 = 5 times: at most 6 attempts, whatever the jitter draws (with Retry-After
    # 0 the waits could all be drawn near 0, and a row once made 12 attempts). Ignoring the
    # deadline would run a row to max_attempts=100.
    server = fault_server(fail_first=1000, faults=("503",), retry_after="0.1")
    with _client(server, cache_dir, max_attempts=3) as client:
        out = _ask(client, 4)
    assert out["attempts"].to_list() == [3] * 4 and (out["error"].struct.field("status") == "UNAVAILABLE").all()
    floor, deadline = 0.1, 0.5
    with _client(server, cache_dir, max_attempts=100, backoff=0.2, deadline=deadline) as client:
        out = _ask(client, 2, prefix="deadline")
    assert out["error"].struct.field("message").str.contains("gave up: retry deadline 0.5s", literal=True).all()
    most = 1 + int(deadline / floor + 1e-9)  # the first attempt, then one per wait that fits
    assert (out["attempts"] <= most).all(), out["attempts"].to_list()


def test_configured_rpm_is_never_exceeded(fault_server, cache_dir):
    server = fault_server()
    with _client(server, cache_dir, rpm=1200) as client:  # 20/s
        out = _ask(client, 60)
    assert out["error"].is_null().all()
    times = server.stats.times
    busiest = max(sum(1 for t in times if start <= t < start + 2.0) for start in times)
    assert busiest <= 42  # 20 per second, plus the window's edges and arrival jitter


def test_configured_tpm_is_never_exceeded():
    from gemframe._core.limits import RateLimiter

    async def takes_in(seconds: float, limiter: RateLimiter, estimate: int, used: int) -> int:
        count, deadline = 0, time.monotonic() + seconds
        while True:
            await limiter.acquire(estimate)
            if time.monotonic() > deadline:
                return count
            limiter.on_answer(time.monotonic(), estimate, used)
            count += 1

    # 6,000 tokens/min: 100/s with bursts of 1,000. In 1 s at most (1000 + 100) / 200 = 5.5 requests.
    assert 5 <= asyncio.run(takes_in(1.0, RateLimiter(tpm=6000), 200, 200)) <= 5
    # The estimate said 200 but each answer used 400 (usageMetadata): the bucket is corrected.
    assert asyncio.run(takes_in(1.0, RateLimiter(tpm=6000), 200, 400)) <= 3


# The loopback tests of an unknown limit count 429s at the server, which is what they are for;
# the share of the limit they reach is a rate over wall time, which on a loaded machine measures
# the machine: on 2 CPUs shared with two other sessions' busy processes, the 6,000/min job once
# reached 85% (its client and server starved of CPU). Whether the limiter settles at >= 90% is
# judged in virtual time, over 12 seeds, idle and starved (test_limits.py, the same limits), and
# measured in bench 9; here a floor that a limiter stuck below the limit falls under (the known
# fast-429 gap, test_limits.py's xfail, holds a job near 67%).
MACHINE_BOUND_FLOOR = 0.75


@pytest.mark.slow
def test_adaptive_rate_settles_under_an_unknown_limit(fault_server, cache_dir):
    # 100 requests/s with 1 s of burst allowance; the client is not told. Counted at the server
    # from the very first request: a cold job must not meet it with a burst (slow start, and
    # requests queued for a slot are paced too), then settle just under it.
    limit = 6000
    server = fault_server(rpm=limit, latency=0.2)
    with _client(server, cache_dir, concurrency=64) as client:  # up to 320 requests/s in flight
        out = _ask(client, 2000)
    stats = server.stats
    share_429 = stats.statuses["429"] / stats.requests
    throughput = 2000 / (stats.last_success - stats.times[0]) * 60 / limit
    print(f"rate limit: {throughput:.0%} of the server's limit, {share_429:.1%} of attempts answered 429")
    assert out["error"].is_null().all()
    assert share_429 <= 0.05
    assert throughput >= MACHINE_BOUND_FLOOR  # 96-99% idle: see MACHINE_BOUND_FLOOR


@pytest.mark.slow  # 420 rows at 20/s: ~21 s, waiting on the limit
def test_cold_start_under_a_low_limit_draws_few_429s(fault_server, cache_dir):
    # 20 requests/s with 1 s of burst allowance, the client not told, at the default concurrency.
    # Slow start spends the allowance, then a whole round (12 of 16) is answered 429 before any
    # answer could tell; the first cut used to start from what was being sent (~55/s) and the
    # next half second at that rate drew a dozen more. Counted at the server from the first
    # request: 6.0-6.2% of attempts were 429 then (27-28 of ~447), 3.7-4.5% now (16-20 of ~438).
    limit = 1200
    server = fault_server(rpm=limit, latency=0.2)
    with _client(server, cache_dir, concurrency=16, backoff=0.5) as client:  # the default back-off
        out = _ask(client, 420)
    stats = server.stats
    share_429 = stats.statuses["429"] / stats.requests
    throughput = 420 / (stats.last_success - stats.times[0]) * 60 / limit
    print(
        f"cold start: {stats.statuses['429']} of {stats.requests} attempts answered 429 ({share_429:.1%}), "
        f"{throughput:.0%} of the limit"
    )
    assert out["error"].is_null().all()
    assert share_429 <= 0.05 and throughput >= MACHINE_BOUND_FLOOR  # 100% idle


def _interrupt_main_when(condition):
    """Ctrl-C, as the terminal sends it: SIGINT to the main thread once ``condition()`` holds
    (watched from another thread). Returns a dict that gets the monotonic time it was sent."""
    main, sent = threading.main_thread().ident, {}

    def watch():
        wait_for(condition)
        sent["at"] = time.monotonic()
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=watch, daemon=True).start()
    return sent


def test_random_429s_do_not_slow_the_job(fault_server, cache_dir):
    # 20% of attempts answered 429 whatever the rate (a shared quota, an overload): slowing down
    # cannot cure that, so a cut must be undone, not repeated. The very same attempts fail for
    # both clients (faults are a function of seed, body and attempt).
    def job(adaptive: bool):
        server = fault_server(seed=1, fault_rate=0.2, faults=("429",), retry_delay="0.2s", latency=0.05)
        with _client(server, cache_dir / str(adaptive), concurrency=64, adaptive=adaptive) as client:
            start = time.monotonic()
            out = _ask(client, 300)
            wall = time.monotonic() - start
        assert out["error"].is_null().all() and server.stats.statuses["429"] > 40
        return wall, client.executor.limiter.adaptive

    fixed, _ = job(adaptive=False)
    wall, limiter = job(adaptive=True)
    print(f"random 429s: {wall:.2f}s vs {fixed:.2f}s with adaptive=False; send rate at the end {limiter.rate}")
    assert limiter.rate is None  # every cut was undone: the job ends unthrottled
    assert limiter.floor > 0.1  # and knows 429s it cannot cure
    # Two runs one after the other on a loaded machine measure the load too (3.7 s against 1.7 s
    # once, on 2 CPUs beside two other sessions' busy processes): that the job is not slowed is
    # judged in virtual time over 12 seeds (test_limits.py::
    # test_a_large_random_share_of_429s_does_not_slow_the_job: <= 1.2x); here, only that it is
    # not many times slower (the ratchet this guards against made it 13-15x).
    assert wall <= 4 * fixed + 1


@pytest.mark.parametrize("seed", [1, 2])
def test_a_small_share_of_random_429s_does_not_ratchet_a_fast_job_down(fault_server, cache_dir, seed):
    # 3% of attempts answered 429 whatever the rate, at over 1,000 requests/s (no latency). At
    # that rate two 429s among a few dozen answers (what trips a cut) come every few dozen
    # milliseconds, and 0 or 1 of the next 30 is what a 3% share gives most of the time: each
    # trial took that for a cure and kept its cut (7 cuts, 1 undone: ~1,350/s down to ~90/s,
    # the fault matrix above 14x slower). A share that never rose with the rate is not a limit.
    server = fault_server(seed=seed, fault_rate=0.03, faults=("429",))
    with _client(server, cache_dir) as client:
        out = _ask(client, 2000)
    limiter = client.executor.limiter.adaptive
    print(
        f"3% random 429s: {server.stats.statuses['429']} of {server.stats.requests} attempts; cuts {limiter.cuts}, "
        f"undone {limiter.undone}, send rate at the end {limiter.rate}, background {limiter.floor:.3f}"
    )
    assert out["error"].is_null().all() and server.stats.statuses["429"] > 40
    # No ratchet: on the code before, 21 and 15 cuts, none undone, ending at 14/s and 63/s. A
    # chance cut may stand a while (tests/test_limits.py weighs the odds over many seeds), never
    # a run of them; and a job that cut at all has undone a cut (the 3% is taken as background).
    assert limiter.cuts - limiter.undone <= 2 and (limiter.undone >= 1 or limiter.cuts == 0)


def test_ctrl_c_cancels_promptly_keeps_answers_and_client_stays_usable(fault_server, cache_dir):
    # Slow start sends 1, 2, 4, then 8 requests, each round as the last one's answers come back.
    # The server answers the first 7 and holds the rest until released: when it has seen 15,
    # 7 answers have reached the client and the next 8 will not come by themselves.
    server = fault_server(hold_after=7)
    with _client(server, cache_dir, concurrency=8, timeout=120) as client:
        interrupted = _interrupt_main_when(lambda: server.stats.requests >= 15)
        with pytest.raises(KeyboardInterrupt):
            _ask(client, 100)
        # Not held up until the held requests time out (120 s) or are answered (never, yet).
        assert time.monotonic() - interrupted["at"] < 30
        assert server.stats.requests == 15  # nothing was sent after the interrupt
        kept = len(client.cache)
        assert kept == len(server.stats.successes) == 7  # every answer that arrived is in the cache
        server.release()
        out = _ask(client, 100)
    assert out["error"].is_null().all() and int(out["cached"].sum()) == kept
    assert server.stats.requests == 15 + 100 - kept  # the rerun sent exactly the rows not answered
    wait_for(lambda: server.stats.in_flight == 0)  # the server ends the abandoned requests first


class _CtrlCInTheCachesBookkeeping:
    """Ctrl-C landing at one exact point of diskcache's transaction bookkeeping, in the main
    thread, once ``armed()`` holds: KeyboardInterrupt can be raised between any two bytecodes,
    so also right after ``BEGIN IMMEDIATE`` (before diskcache marks the transaction as this
    thread's), right after that mark, or on the way to ``COMMIT``. All three are where the mark
    (``_Store._txn_id``) is set, so a property there raises the interrupt as a signal would."""

    def __init__(self, at: str, armed) -> None:
        self.at, self.armed, self.fired = at, armed, False

    def get(self, store):
        return store.__dict__.get("_txn_id_value")

    def set(self, store, value) -> None:
        trigger = (
            not self.fired
            and threading.current_thread() is threading.main_thread()
            and (value is None) == (self.at == "on the way to COMMIT")
            and self.armed()
        )
        if trigger and self.at == "after BEGIN":
            self.fired = True
            raise KeyboardInterrupt
        store.__dict__["_txn_id_value"] = value
        if trigger:
            self.fired = True
            raise KeyboardInterrupt


@pytest.mark.parametrize("at", ["after BEGIN", "after diskcache marks it", "on the way to COMMIT"])
def test_ctrl_c_inside_a_cache_transaction_keeps_every_answer(fault_server, cache_dir, monkeypatch, at):
    # The test above failed in one of two full-suite runs (2026-11-30) with diskcache.Timeout instead of
    # KeyboardInterrupt: the SIGINT had landed between BEGIN and diskcache's bookkeeping, the
    # connection stayed in a transaction, and the answers stored on the way out could not begin
    # theirs. Where the mark was already set, they joined the open transaction and were never
    # committed. Here the interrupt lands at each point on purpose: the server answers the first
    # request and holds the rest, so exactly one answer was paid for when it comes.
    from gemframe._core.cache.disk import _Store

    server = fault_server(hold_after=1)
    interrupt = _CtrlCInTheCachesBookkeeping(at, armed=lambda: len(server.stats.successes) >= 1)
    monkeypatch.setattr(_Store, "_txn_id", property(interrupt.get, interrupt.set), raising=False)
    with _client(server, cache_dir, concurrency=8, timeout=120) as client:
        with pytest.raises(KeyboardInterrupt):
            _ask(client, 100)
        assert interrupt.fired and len(server.stats.successes) == 1
    sent = server.stats.requests
    server.release()  # the abandoned requests end
    wait_for(lambda: server.stats.in_flight == 0)
    with _client(server, cache_dir, concurrency=8) as client:  # a new connection: what was committed
        out = _ask(client, 100)
    assert out["error"].is_null().all()
    # The one answer that had arrived was stored, and the rerun sent exactly the other 99 rows.
    assert int(out["cached"].sum()) == 1 and server.stats.requests == sent + 99


def _body(i):
    return {"contents": [{"role": "user", "parts": [{"text": f"row {i}"}]}]}


def _raise_error():
    raise RuntimeError("the row source broke")


def _press_ctrl_c():
    signal.raise_signal(signal.SIGINT)  # handled in this (the main) thread: KeyboardInterrupt
    threading.Event().wait(5)
    raise AssertionError("SIGINT did not interrupt")


@pytest.mark.parametrize("end", [_raise_error, _press_ctrl_c], ids=["exception", "ctrl-c"])
def test_a_call_that_ends_early_keeps_every_answer_that_arrived(fault_server, cache_dir, end):
    """The rows come from user code that fails (or Ctrl-C) while answers wait to be collected:
    they are stored all the same, so the rerun sends exactly the rows not answered before."""
    rows = 300
    server = fault_server()

    def source():
        for i in range(rows):
            if i == 256:  # the first lookup batch (256 rows) is sent; the client reads on
                # One request at a time: the server seeing request 256 means 255 answers arrived,
                # most of them still waiting on the call's queue while this row is read.
                wait_for(lambda: server.stats.requests >= 256)
                end()
            yield _body(i)

    with _client(server, cache_dir, concurrency=1) as client:
        with pytest.raises((RuntimeError, KeyboardInterrupt)):
            client.send(source())
        stored = len(client.cache)
        answered = len(server.stats.successes)
        assert server.stats.requests == 256  # nothing was sent after the end
        assert 255 <= stored <= answered
        out = client.send([_body(i) for i in range(rows)])
    assert out.struct.field("error").is_null().all()
    assert int(out.struct.field("cached").sum()) == stored
    assert server.stats.requests == 256 + rows - stored  # the rerun sent exactly the rest
    print(f"ended after {answered} answers: {stored} stored, the rerun sent {rows - stored}")


def test_a_key_revoked_mid_run_keeps_every_answer_that_arrived(fault_server, cache_dir):
    server = fault_server(revoke_after=50)
    with _client(server, cache_dir, concurrency=1) as client:
        with pytest.raises(gf.AuthenticationError, match="API key expired"):
            _ask(client, 200)
        assert len(server.stats.successes) == 50 and server.stats.statuses["401"] == 1  # no retry of a 401
        assert len(client.cache) == 50  # every 200 answer is in the cache
        server.revoke_after = None  # a new key
        out = _ask(client, 200)
    assert out["error"].is_null().all() and int(out["cached"].sum()) == 50
    assert server.stats.requests == 51 + 150  # the rerun sent only the 150 rows not answered


async def _read_request(receive):
    """An ASGI request's messages (to hand on) and its whole body."""
    messages = [await receive()]
    while messages[-1].get("more_body"):
        messages.append(await receive())
    return messages, b"".join(m.get("body", b"") for m in messages)


def _replay(messages):
    """An ASGI ``receive`` giving back messages already read."""
    pending = iter(messages)

    async def receive():
        return next(pending)

    return receive


class _CrashesOn:
    """An ASGI app in front of the emulator that raises (as a buggy app or test double may)
    for requests whose body contains ``marker``."""

    def __init__(self, emulator, marker):
        self.emulator, self.marker, self.crashes = emulator, marker.encode(), 0

    async def __call__(self, scope, receive, send):
        messages, body = await _read_request(receive)
        if self.marker in body:
            self.crashes += 1
            raise RuntimeError("the app fell over")
        await self.emulator(scope, _replay(messages), send)


def test_an_app_exception_is_that_rows_error_and_the_call_goes_on(cache_dir):
    emulator = Emulator(latency=0.01)  # many requests in flight around the one that crashes
    app = _CrashesOn(emulator, 'row 40"')
    with gf.Client(gf.EmulatorProvider(app=app), cache_dir=str(cache_dir), concurrency=16, progress=False) as client:
        out = _ask(client, 200)
        errors = out.filter(pl.col("error").is_not_null())
        assert errors["prompt"].to_list() == ["row 40"] and app.crashes == 1  # not retried
        assert errors["error"][0]["status"] == "CLIENT_ERROR" and "RuntimeError" in errors["error"][0]["message"]
        assert out["text"].is_not_null().sum() == 199 and emulator.stats.requests == 199
        out = _ask(client, 200)  # the answers were cached; only the failed row is asked again
    assert int(out["cached"].sum()) == 199 and emulator.stats.requests == 199 and app.crashes == 2


def test_an_answer_that_cannot_be_read_is_that_rows_error(cache_dir, tmp_path):
    """A 200 answer whose image data is not base64 fails its row, not the call."""
    emulator = Emulator()
    broken = json.dumps(
        {
            "candidates": [
                {
                    "finishReason": "STOP",
                    "content": {
                        "role": "model",
                        "parts": [{"inlineData": {"mimeType": "image/png", "data": "not*base64"}}],
                    },
                }
            ]
        }
    ).encode()

    async def app(scope, receive, send):
        messages, body = await _read_request(receive)
        if b"broken" not in body:
            return await emulator(scope, _replay(messages), send)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": broken})

    with gf.Client(gf.EmulatorProvider(app=app), cache_dir=str(cache_dir), progress=False) as client:
        frame = pl.DataFrame({"prompt": ["fine", "broken", "fine too"]})
        out = frame.with_columns(reply=gf.generate("prompt", client=client, image_dir=str(tmp_path / "img"))).unnest(
            "reply"
        )
    assert out["error"].struct.field("status").to_list() == [None, "MALFORMED_RESPONSE", None]
    assert out["error"][1]["message"].startswith("could not read the answer: binascii.Error: ")
    assert out["text"][0].startswith("Emulated reply") and out["text"][2].startswith("Emulated reply")


def test_bad_input_gives_clear_errors_and_the_job_goes_on(client, emulator, tmp_path, image_bytes):
    (tmp_path / "notes.txt").write_text("not an image")
    with open(tmp_path / "big.png", "wb") as big:  # sparse: over the Files API's 2 GB a file, nothing on disk
        big.write(image_bytes("PNG"))
        big.truncate(2 * 2**30 + 1)
    frame = pl.DataFrame(
        {
            "prompt": [
                "fine",
                "missing",
                "text file",
                "huge",
                "[emulator:safety] x",
                "[emulator:recitation] y",
                "[emulator:block] z",
                "[emulator:empty] w",
                "é" * 50_000,
            ],
            "image": [
                None,
                str(tmp_path / "nope.png"),
                str(tmp_path / "notes.txt"),
                str(tmp_path / "big.png"),
                None,
                None,
                None,
                None,
                None,
            ],
        }
    )
    out = frame.with_columns(reply=gf.generate("prompt", images="image", client=client)).unnest("reply")
    status = out["error"].struct.field("status").to_list()
    messages = out["error"].struct.field("message").to_list()
    assert status == [
        None,
        "INVALID_INPUT",
        "INVALID_INPUT",
        "INVALID_INPUT",
        "SAFETY",
        "RECITATION",
        "BLOCKED",
        "NO_CANDIDATES",
        None,
    ]
    assert "row 1" in messages[1] and "nope.png" in messages[1]
    assert "is not a PNG, JPEG" in messages[2] and "over the 2 GB the Files API takes per file" in messages[3]
    assert out["block_reason"][6] == "SAFETY" and out["finish_reason"][4] == "SAFETY"
    assert emulator.stats.requests == 6  # the three bad inputs were never sent
    with pytest.raises(gf.InputError, match="prompt column"):
        pl.DataFrame({"prompt": [b"\xff\xfe"]}).with_columns(reply=gf.generate("prompt", client=client))


def test_the_key_never_leaks(fault_server, tmp_path, caplog, capsys):
    server = fault_server(seed=3, fault_rate=0.3)
    cache_dir = tmp_path / "cache"
    src = tmp_path / "in.parquet"
    pl.DataFrame({"prompt": [f"secret test {i}" for i in range(60)]}).write_parquet(src)
    caplog.set_level(logging.DEBUG)
    with _client(server, cache_dir, progress=True) as client:
        manifest = run(str(src), str(tmp_path / "out.parquet"), client=client)
        texts = [repr(client), str(vars(client)), repr(client.provider), repr(client.executor)]
    assert all(h.get("x-goog-api-key") == KEY for h in server.seen_headers)  # it was really used
    bad = Emulator(api_key="the-right-one")
    with gf.Client("emulator", app=bad, api_key=KEY, cache_dir=str(cache_dir), progress=False) as wrong:
        with pytest.raises(gf.AuthenticationError) as error:
            _ask(wrong, 3)
    texts += [str(error.value), repr(error.value), caplog.text, *capsys.readouterr()]
    texts.append(str(read_manifest(str(tmp_path / "out.parquet"))) + str(manifest))
    assert any("retrying" in r.message for r in caplog.records)  # retries were logged...
    assert not [t for t in texts if KEY in t]  # ...and nothing anywhere shows the key
    with gf.ResponseCache(cache_dir) as cache:
        assert len(cache) == 60  # the answers are there to be searched
    assert _where_in_cache(cache_dir, KEY) == []
    # The search can fail: the same search finds the key once an answer holding it is stored,
    # small (inside the database) or large (in a file of its own).
    planted = tmp_path / "planted"
    with gf.ResponseCache(planted) as cache:
        cache.set_many(
            [
                ("0" * 64, "m", f'{{"text": "{KEY}"}}'.encode()),
                ("1" * 64, "m", f'{{"text": "{KEY}"}}'.encode() + b" " * 2**20),
            ]
        )
    found = _where_in_cache(planted, KEY)
    assert "entry 000000" in found and "entry 111111" in found
    assert any(place.endswith(".val") for place in found) and any(".db" in place for place in found)


def _where_in_cache(directory, secret: str) -> list[str]:
    """Where ``secret`` is in a cache directory: the bytes of every file under it (the SQLite
    database and its journals, answer files) and every stored entry as gemframe reads it."""
    places = []
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                if secret.encode() in file.read():
                    places.append(os.path.relpath(os.path.join(root, name), directory))
    with gf.ResponseCache(directory) as cache:
        for entry in cache.entries():
            if secret in entry["key"] or secret in str(entry["model"]) or secret.encode() in entry["response"]:
                places.append(f"entry {entry['key'][:6]}")
    return places


def _run_cli(src, dst, server, cache_dir, *extra):
    import subprocess

    env = {**os.environ, "GEMINI_API_KEY": KEY}
    command = gemframe_command(
        *gemframe_run_args(src, dst, provider="google", base_url=server.url, cache_dir=cache_dir), *extra
    )
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_kill_9_then_rerun_resends_only_unanswered_rows(fault_server, tmp_path):
    import signal

    rows = 300
    server = fault_server(latency=0.05)
    src, dst, cache_dir = tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "cache"
    pl.DataFrame({"id": range(rows), "prompt": [f"job row {i}" for i in range(rows)]}).write_parquet(src)
    job = _run_cli(src, dst, server, cache_dir, "--concurrency", "4", "--batch-rows", "50")
    wait_for(lambda: len(server.stats.successes) >= 100)
    job.send_signal(signal.SIGKILL)
    job.wait()
    # The server has read what the killed job sent and answered it (to nobody) once the job's
    # connections are closed at its end too: a fixed sleep could count an answer too early.
    wait_for(lambda: server.stats.connections == 0)
    assert not dst.exists()  # no half-written output
    answered_before = len(server.stats.successes)
    with gf.ResponseCache(cache_dir) as cache:
        stored = len(cache)
    assert 0 < stored <= answered_before
    before = server.stats.requests
    rerun = _run_cli(src, dst, server, cache_dir, "--concurrency", "4")
    assert rerun.wait(60) == 0, rerun.stderr.read().decode()
    resent = server.stats.requests - before
    assert resent == rows - stored  # only what was not yet answered (counted at the server)
    out = pl.read_parquet(dst)
    assert out["id"].to_list() == list(range(rows)) and out["error"].is_null().all()
    assert read_manifest(str(dst))["requests_sent"] == rows - stored
    paid_twice = sum(1 for n in server.stats.successes.values() if n > 1)
    assert paid_twice == answered_before - stored <= 4  # at most the answers in flight at the kill
    print(f"kill -9 after {answered_before} answers ({stored} stored): rerun sent {resent}, paid twice {paid_twice}")


@pytest.mark.slow
def test_two_processes_share_one_cache(fault_server, tmp_path):
    server = fault_server(latency=0.01)
    src, cache_dir = tmp_path / "in.parquet", tmp_path / "cache"
    pl.DataFrame({"prompt": [f"shared {i}" for i in range(400)]}).write_parquet(src)
    jobs = [_run_cli(src, tmp_path / f"out{n}.parquet", server, cache_dir, "--concurrency", "8") for n in (1, 2)]
    assert [job.wait(60) for job in jobs] == [0, 0]
    one, two = (pl.read_parquet(tmp_path / f"out{n}.parquet") for n in (1, 2))
    assert one["text"].to_list() == two["text"].to_list() == [f"answer to: shared {i}" for i in range(400)]
    with gf.ResponseCache(cache_dir) as cache:
        assert len(cache) == 400
    before = server.stats.requests
    assert _run_cli(src, tmp_path / "out3.parquet", server, cache_dir).wait(60) == 0
    assert server.stats.requests == before


def test_credentials_in_base_url_are_never_shown(fault_server, served_emulator, tmp_path, caplog):
    """``base_url="http://user:PASSWORD@host"``: used for sending, shown nowhere (repr, errors,
    DEBUG logs, the manifest of a ``gemframe run``, ``gemframe manifest`` and ``gemframe report``)."""
    import base64

    password = "pw-DO-NOT-SHOW-9876"
    server = fault_server(seed=3, fault_rate=0.3)  # faults, so "retrying <url>" lines are logged
    base = f"http://user:{password}@127.0.0.1:{server.port}"
    caplog.set_level(logging.DEBUG)
    with gf.Client(
        "google",
        api_key=KEY,
        base_url=base,
        cache_dir=str(tmp_path / "c1"),
        backoff=0.02,
        max_attempts=10,
        progress=False,
    ) as client:
        _ask(client, 30)
        texts = [repr(client), repr(client.provider), repr(client.executor)]
    assert any("retrying" in r.message for r in caplog.records)
    assert (
        server.seen_headers[0]["authorization"] == "Basic " + base64.b64encode(f"user:{password}".encode()).decode()
    )  # really used
    emulator = served_emulator()
    with gf.Client(
        "google",
        api_key=KEY,
        base_url=f"http://user:{password}@127.0.0.1:{emulator.port}",
        model="no-such-model",
        cache_dir=str(tmp_path / "c2"),
        progress=False,
    ) as client:
        with pytest.raises(gf.NotFoundError, match=r"base URL \(http://\*\*\*@127\.0\.0\.1") as error:
            _ask(client, 2)
    texts += [str(error.value), repr(error.value), caplog.text]

    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pl.DataFrame({"prompt": [f"cli row {i}" for i in range(20)]}).write_parquet(src)
    commands = [
        [
            *gemframe_run_args(src, dst, provider="google", base_url=base, cache_dir=tmp_path / "c3"),
            "--manifest",
            tmp_path / "manifest.json",
        ],
        ["manifest", str(dst)],
        ["report", str(dst), "--html", str(tmp_path / "report.html")],
    ]
    for command in commands:
        done = gemframe_cli(*command, GEMINI_API_KEY=KEY)
        assert done.returncode == 0, done.stderr
        texts += [done.stdout, done.stderr]
    manifest = read_manifest(str(dst))
    assert manifest["base_url"] == f"http://***@127.0.0.1:{server.port}"
    texts += [str(manifest), (tmp_path / "manifest.json").read_text(), (tmp_path / "report.html").read_text()]
    assert [t for t in texts if password in t] == []
