"""The executor: one HTTP request per distinct request in flight, whoever asks for it, and
giving up cancels only what nobody else waits for."""

import queue

import orjson

import gemframe as gf
from gemframe._core.executor import Executor
from gemframe.emulator import Emulator


def _two_callers(prompt: str, latency: float):
    """An executor on an emulator answering after ``latency`` s, and two callers' done queues
    that have both asked for the same request."""
    emulator = Emulator(latency=latency)
    executor = Executor(gf.EmulatorProvider(app=emulator), concurrency=4)
    request = (
        prompt,
        gf.EmulatorProvider().url("gemini-2.0-flash"),
        orjson.dumps({"contents": [{"role": "user", "parts": [{"text": prompt}]}]}),
    )
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
    _, executor, first, second = _two_callers("abandoned", latency=60.0)
    executor.cancel(first)
    executor.cancel(second)
    _, task = second.get(timeout=30)  # long before the 60 s answer, however loaded the machine
    assert task.cancelled()
    executor.close()


UNCLOSED_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import polars as pl
import gemframe as gf
from gemframe.emulator import Emulator
from tests.conftest import ServedEmulator

served = ServedEmulator(Emulator())  # over TCP: the aiohttp session, as for the real API
frame = pl.DataFrame({{"prompt": [f"question {{i}}" for i in range(20)]}})

def answer(system):  # a Client made, used and dropped without close()
    client = gf.Client("google", api_key="k", base_url=served.url, cache_dir={cache!r}, progress=False)
    return frame.with_columns(reply=gf.generate("prompt", client=client, system=system))

for i in range(3):
    out = answer(f"system {{i}}")
kept = gf.Client("google", api_key="k", base_url=served.url, cache_dir={cache!r}, progress=False)
out = frame.with_columns(reply=gf.generate("prompt", client=kept))  # alive, unclosed, at exit
print(out["reply"].struct.field("error").null_count(), served.emulator.stats.requests)
"""


def test_a_client_never_closed_leaves_no_unclosed_session_warnings(tmp_path):
    """aiohttp reports an open session from its ``__del__``: clients dropped without
    ``close()`` and one still open at exit must have closed theirs."""
    from ._zygote import python_c
    from .conftest import ROOT

    # Through the zygote: a fresh `python -c`, exiting as any interpreter does, without its imports.
    done = python_c(UNCLOSED_SCRIPT.format(root=str(ROOT), cache=str(tmp_path / "cache")))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["20", "80"]  # every row answered; 4 systems x 20 prompts sent
    assert "Unclosed" not in done.stderr, done.stderr[:2000]
