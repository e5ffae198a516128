"""The executor: one HTTP request per distinct request in flight, whoever asks for it, and
giving up cancels only what nobody else waits for."""

import queue

import orjson

import gemframe as gf
from gemframe.emulator import Emulator
from gemframe._core.executor import Executor


def _two_callers(prompt: str, latency: float):
    """An executor on an emulator answering after ``latency`` s, and two callers' done queues
    that have both asked for the same request."""
    emulator = Emulator(latency=latency)
    executor = Executor(gf.EmulatorProvider(app=emulator), concurrency=4)
    request = (prompt, gf.EmulatorProvider().url("gemini-2.0-flash"),
               orjson.dumps({"contents": [{"role": "user", "parts": [{"text": prompt}]}]}))
    first, second = queue.SimpleQueue(), queue.SimpleQueue()
    executor.submit_many([request], first)
    executor.submit_many([request], second)
    return emulator, executor, first, second


def test_callers_of_one_request_share_it_and_one_giving_up_leaves_it_running():
    emulator, executor, first, second = _two_callers("shared", latency=0.3)
    executor.cancel(first)  # the first caller gives up (Ctrl-C); the second still waits
    key, task = second.get(timeout=10)
    outcome = task.result()
    assert key == "shared" and outcome.error is None and b"shared" in outcome.raw
    assert emulator.stats.requests == 1
    executor.close()


def test_a_request_nobody_waits_for_is_cancelled():
    _, executor, first, second = _two_callers("abandoned", latency=2.0)
    executor.cancel(first)
    executor.cancel(second)
    _, task = second.get(timeout=1.5)  # well before the 2 s answer
    assert task.cancelled()
    executor.close()
