"""gemframe.ray on a local Ray instance (two CPUs), against the emulator served over TCP:
the same answers as the polars path, a rerun answered from the cache, and a cluster-wide rate
limit that holds at the server."""

from __future__ import annotations

import bisect
import pickle
import time

import polars as pl
import pytest
from polars.testing import assert_frame_equal

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")

import gemframe as gf
import gemframe.ray as gray
from gemframe.emulator import Emulator

from .conftest import ServedEmulator

# A hung Ray must not hang CI: the thread method ends the run even inside a blocking call (it
# ends the worker process too, so only a hang may reach it: a test took 171 s at load 21 on
# 2 CPUs, one that took 7 s idle). One local Ray of two CPUs on the machine at a time: the
# "ray" group (tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600, method="thread"), pytest.mark.xdist_group("ray")]

KEY = "sk-test-DO-NOT-SHOW-1234"
PER_ROW = ["cached", "attempts", "latency_ms"]  # how a row was answered, not what


class RecordingApp:
    """The emulator behind a wrapper that notes when each generate request arrives."""

    def __init__(self, app: Emulator) -> None:
        self.app = app
        self.arrivals: list[float] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].endswith(":generateContent"):
            self.arrivals.append(time.monotonic())
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def ray_local():
    with pytest.MonkeyPatch.context() as env:  # the workers inherit this environment:
        for var in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "SEGMIND_API_KEY", "GEMFRAME_PROVIDER"):
            env.delenv(var, raising=False)  # no developer key reaches them
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def server():
    app = RecordingApp(Emulator())
    served = ServedEmulator(app)
    yield served, app
    served.stop()


def _served_as_google(served: ServedEmulator, cache_dir) -> dict:
    """Where the actors send: the served emulator as the Google API, with KEY; and their cache."""
    return dict(provider="google", api_key=KEY, base_url=served.url, cache_dir=str(cache_dir))


def _requests(app: RecordingApp) -> int:
    return app.app.stats.requests


def _frame(rows: int, image: bytes | None = None) -> pl.DataFrame:
    """Prompts with repeats, a null prompt, and an image on every 7th row."""
    return pl.DataFrame(
        {
            "id": range(rows),
            "prompt": [None if i == 5 else f"question {i % (rows - 20)}" for i in range(rows)],
            "image": [image if image is not None and i % 7 == 0 else None for i in range(rows)],
        },
        schema={"id": pl.Int64, "prompt": pl.String, "image": pl.Binary},
    )


def _dataset(frame: pl.DataFrame, block: int):
    table = frame.to_arrow()
    return ray.data.from_arrow([table.slice(i, block) for i in range(0, table.num_rows, block)])


def _collect(dataset) -> pl.DataFrame:
    return pl.from_arrow(pa.concat_tables(ray.get(dataset.to_arrow_refs()))).sort("id")


def _answers(frame: pl.DataFrame) -> pl.DataFrame:
    """What was answered, per row: the reply's fields without how it was answered."""
    return frame.sort("id").select("id", pl.col("reply").struct.unnest()).drop(PER_ROW)


def test_same_answers_as_polars_and_rerun_from_cache(ray_local, server, tmp_path, image_bytes):
    served, app = server
    frame = _frame(300, image_bytes("PNG", (16, 12), "teal"))
    options = dict(images="image", system="Be terse.", config={"temperature": 0})

    with gf.Client(
        "google", api_key=KEY, base_url=served.url, cache_dir=str(tmp_path / "polars"), progress=False
    ) as client:
        expected = frame.with_columns(reply=gf.generate("prompt", client=client, **options))

    before = _requests(app)
    out = gray.generate(
        _dataset(frame, 30),
        "prompt",
        **_served_as_google(served, tmp_path / "ray"),
        num_actors=2,
        batch_size=32,
        num_cpus=0.5,
        **options,
    )
    first = _collect(out)
    sent = _requests(app) - before

    assert first.columns == ["id", "prompt", "image", "reply"]
    assert first.schema["reply"] == expected.schema["reply"]
    assert_frame_equal(first.drop("reply"), frame)  # input columns pass through untouched
    assert_frame_equal(_answers(first), _answers(expected))
    assert first["reply"].struct.field("text").null_count() == 1  # the null prompt: null reply
    distinct = frame["prompt"].drop_nulls().n_unique()
    assert distinct <= sent <= frame.height - 1  # each distinct request once (twice at most if
    # two actors asked for it at the same moment)

    # Rerun, new dataset, same cache directory, what to ask as one gf.RequestSpec (handed to
    # the actors as it is): the same requests, so nothing reaches the server.
    before = _requests(app)
    spec = gf.RequestSpec(system="Be terse.", config={"temperature": 0})
    again = _collect(
        gray.generate(
            _dataset(frame, 30),
            "prompt",
            images="image",
            spec=spec,
            **_served_as_google(served, tmp_path / "ray"),
            num_actors=2,
            batch_size=32,
            num_cpus=0.5,
        )
    )
    assert _requests(app) == before
    assert again["reply"].struct.field("cached").drop_nulls().all()
    assert_frame_equal(_answers(again), _answers(expected))


def test_global_rate_limit_holds_at_the_server(ray_local, server, tmp_path):
    served, app = server
    rpm, rows, per_second = 2400, 200, 40  # 40 requests/s for the cluster, 20 per actor
    frame = pl.DataFrame({"id": range(rows), "prompt": [f"paced {i}" for i in range(rows)]})
    start = len(app.arrivals)
    out = _collect(
        gray.generate(
            _dataset(frame, 20),
            "prompt",
            **_served_as_google(served, tmp_path / "cache"),
            rpm=rpm,
            num_actors=2,
            batch_size=20,
            num_cpus=0.5,
        )
    )
    assert out["reply"].struct.field("error").is_null().all()
    arrivals = sorted(app.arrivals[start:])
    assert len(arrivals) == rows
    busiest = max(bisect.bisect_left(arrivals, t + 1.0) - i for i, t in enumerate(arrivals))
    assert busiest <= per_second + 1, f"{busiest} requests arrived within one second"
    assert (rows - 1) / (arrivals[-1] - arrivals[0]) <= per_second * 1.05  # nor faster overall
    assert busiest > per_second / 2 + 1  # both actors' shares were in use at once


def test_unnest_and_the_key_stays_hidden(ray_local, server, tmp_path):
    served, app = server
    frame = pl.DataFrame({"id": range(40), "q": [f"short {i}" for i in range(40)]})
    out = gray.generate(
        _dataset(frame, 10),
        pl.col("q").str.to_uppercase(),
        **_served_as_google(served, tmp_path / "cache"),
        unnest=True,
        num_cpus=0.5,
    )
    got = _collect(out)
    assert got.columns[:2] == ["id", "q"] and "text" in got.columns and "reply" not in got.columns
    assert got["text"].to_list() == [f'Emulated reply to: "SHORT {i}".' for i in range(40)]
    for shown in (repr(out), str(out), out.stats(), repr(got.to_dicts())):
        assert KEY not in shown


def test_callable_class_alone(server, tmp_path):
    """GeminiBatch works on a plain Arrow table (what map_batches hands it), with a share."""
    served, app = server
    batch = gray.GeminiBatch(
        "prompt",
        provider="google",
        api_key=gray.Secret(KEY),
        base_url=served.url,
        cache_dir=str(tmp_path / "cache"),
        concurrency=8,
        rpm=600,
        tpm=60_000,
        num_actors=4,
        output="answer",
    )
    try:
        assert KEY not in repr(batch)
        assert batch.client.executor.concurrency == 2
        assert batch.client.executor.limiter.requests.rate == pytest.approx(600 / 60 / 4)
        assert batch.client.executor.limiter.tokens.rate == pytest.approx(60_000 / 60 / 4)
        table = pa.table({"prompt": ["a", None, "b"], "extra": pa.array([1, 2, 3], pa.int8())})
        result = batch(table)
        assert result.column_names == ["prompt", "extra", "answer"]
        assert result.schema.field("extra").type == pa.int8()
        assert pl.from_arrow(result)["answer"].struct.field("text").to_list() == [
            'Emulated reply to: "a".',
            None,
            'Emulated reply to: "b".',
        ]
        calls = []
        send = batch.client.send
        batch.client.send = lambda rows, **kw: calls.append(1) or send(rows, **kw)
        chunked = pa.concat_tables([table.slice(0, 1), table.slice(1, 1), table.slice(2)])
        assert chunked.column("prompt").num_chunks == 3
        again = pl.from_arrow(batch(chunked))["answer"].struct.field("cached")
        assert again.to_list() == [True, None, True] and calls == [1]  # one call for the batch
        with pytest.raises(ValueError, match="already has column"):
            batch(table.rename_columns(["prompt", "answer"]))  # would overwrite a column
        with pytest.raises(KeyError, match="not in the dataset"):
            batch(table.rename_columns(["question", "extra"]))
    finally:
        batch.close()


def test_checked_on_the_driver_before_anything_runs(ray_local):
    dataset = ray.data.from_items([{"prompt": "x"}])
    with pytest.raises(gf.InputError):
        gray.generate(dataset, config={"not_a_config_key": 1}, provider="emulator")
    with pytest.raises(gf.ConfigError, match="sample must be"):
        gray.generate(dataset, spec=gf.RequestSpec(), sample=-1, provider="emulator")
    with pytest.raises(ValueError, match="concurrency"):
        gray.generate(dataset, concurrency=2, num_actors=4, provider="emulator")
    with pytest.raises(TypeError, match="name"):
        gray.generate(dataset, provider=gf.GoogleAI(api_key=KEY))


def test_eight_actors_fit_a_two_cpu_machine(ray_local, server, tmp_path):
    """num_actors=8 on 2 CPUs, default num_cpus, reading parquet (read tasks need a CPU each):
    it used to wait forever (8 actors of 1 CPU: running=2, pending=6)."""
    served, app = server
    rows = 160
    source = tmp_path / "prompts"
    source.mkdir()
    frame = pl.DataFrame({"id": range(rows), "prompt": [f"eight {i}" for i in range(rows)]})
    for part in range(16):  # a block per file: two per actor
        frame.slice(part * 10, 10).write_parquet(source / f"part-{part:02}.parquet")
    before = _requests(app)
    out = _collect(
        gray.generate(
            ray.data.read_parquet(str(source), override_num_blocks=16),
            "prompt",
            **_served_as_google(served, tmp_path / "cache"),
            num_actors=8,
            concurrency=16,
            batch_size=10,
        )
    )
    assert out["id"].to_list() == list(range(rows))
    assert out["reply"].struct.field("text").to_list() == [f'Emulated reply to: "eight {i}".' for i in range(rows)]
    assert _requests(app) - before == rows


def test_a_pool_the_cluster_cannot_hold_fails_with_the_fix(ray_local, server, tmp_path):
    """Two actors of 1.5 CPUs on 2 CPUs cannot be placed: a ConfigError naming the fix, raised
    by generate() after placement_timeout, not a job that waits forever."""
    served, app = server
    dataset = ray.data.from_items([{"prompt": "never sent"}])
    before = _requests(app)
    start = time.monotonic()
    with pytest.raises(gf.ConfigError) as error:
        gray.generate(
            dataset,
            "prompt",
            **_served_as_google(served, tmp_path / "cache"),
            num_actors=2,
            num_cpus=1.5,
            placement_timeout=2,
        )
    assert time.monotonic() - start < 30
    message = str(error.value)
    assert "could not place num_actors=2" in message and "it has 2 CPUs" in message
    assert "num_actors=1" in message and "num_cpus=" in message and "placement_timeout" in message
    assert _requests(app) == before


def test_secret_survives_pickling_and_never_prints():
    secret = pickle.loads(pickle.dumps(gray.Secret(KEY)))
    assert secret.reveal() == KEY
    assert KEY not in repr(secret) and KEY not in str(secret) and KEY not in f"{secret}"
    assert gray.share(None, 3) is None and gray.share(90, 3) == 30
