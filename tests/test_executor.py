"""The executor: one HTTP request per distinct request in flight, whoever asks for it, and
giving up cancels only what nobody else waits for."""

import queue

import orjson

import gemframe as gf
from gemframe.emulator import Emulator
from gemframe.executor import Executor


def _request(prompt: str) -> tuple[str, str, bytes]:
    provider_url = gf.EmulatorProvider().url("gemini-2.0-flash")
    return prompt, provider_url, orjson.dumps({"contents": [{"role": "user", "parts": [{"text": prompt}]}]})


def test_callers_of_one_request_share_it_and_one_giving_up_leaves_it_running():
    emulator = Emulator(latency=0.3)
    executor = Executor(gf.EmulatorProvider(app=emulator), concurrency=4)
    first, second = queue.SimpleQueue(), queue.SimpleQueue()
    executor.submit_many([_request("shared")], first)
    executor.submit_many([_request("shared")], second)
    executor.cancel(first)  # the first caller gives up (Ctrl-C); the second still waits
    key, task = second.get(timeout=10)
    outcome = task.result()
    assert key == "shared" and outcome.error is None and b"shared" in outcome.raw
    assert emulator.stats.requests == 1
    executor.close()


def test_a_request_nobody_waits_for_is_cancelled():
    emulator = Emulator(latency=2.0)
    executor = Executor(gf.EmulatorProvider(app=emulator), concurrency=4)
    first, second = queue.SimpleQueue(), queue.SimpleQueue()
    executor.submit_many([_request("abandoned")], first)
    executor.submit_many([_request("abandoned")], second)
    executor.cancel(first)
    executor.cancel(second)
    _, task = second.get(timeout=1.5)  # well before the 2 s answer
    assert task.cancelled()
    executor.close()
